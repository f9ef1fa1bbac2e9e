"""The replay clients under their older import path, for importers outside replay/.

Place in the data flow: actors insert through replay/insert.py, learners sample through
replay/sample.py, one-off stats requests go through replay/connect.py; this module only
names them, so `from replay.client import InsertClient` keeps working.
"""

from __future__ import annotations

from replay.connect import request_stats
from replay.insert import InsertClient
from replay.sample import TRAIN_FIELDS, SampleClient, TensorBatch, to_tensors

__all__ = ["TRAIN_FIELDS", "InsertClient", "SampleClient", "TensorBatch", "request_stats", "to_tensors"]
