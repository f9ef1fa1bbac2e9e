"""The replay clients under their older import path, for importers outside replay/.

Place in the data flow: actors insert through replay/insert.py, learners sample through
replay/sample.py, one-off stats requests go through replay/connect.py; this module only
names them, so `from canopy.replay.client import InsertClient` keeps working.
"""

from __future__ import annotations

from canopy.replay.connect import request_stats
from canopy.replay.insert import InsertClient
from canopy.replay.sample import TRAIN_FIELDS, SampleClient, TensorBatch, to_tensors

__all__ = ["TRAIN_FIELDS", "InsertClient", "SampleClient", "TensorBatch", "request_stats", "to_tensors"]
