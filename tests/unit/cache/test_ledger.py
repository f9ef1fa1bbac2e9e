"""cache/ledger.py: the fields of a version's ledger entry and its publish time read back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from canopy.cache import blob, ledger
from canopy.version import Version


def manifest() -> blob.Manifest:
    m, _ = blob.pack({"w": np.arange(4, dtype=np.float32)}, Version(3, 40), arch="mlp", learner=2)
    return dataclasses.replace(m, published_at=1700000000.25)


def test_an_entry_without_a_checkpoint_has_the_fields_blob_write_stores() -> None:
    m = manifest()
    assert ledger.entry(m) == {
        "learner": "2",
        "epoch": "3",
        "step": "40",
        "digest": m.digest,
        "published_at": "1700000000.250000",
        "parent": m.parent or "-",
        "codec": "raw",
    }


@pytest.mark.parametrize(("checkpoint", "stored"), [("3.20", "3.20"), ("", "-")])
def test_a_fenced_entry_names_the_checkpoint_it_descends_from(checkpoint: str, stored: str) -> None:
    fields = ledger.entry(manifest(), checkpoint)
    assert fields["checkpoint"] == stored
    assert list(fields) == [
        "learner", "epoch", "step", "digest", "published_at", "checkpoint", "parent", "codec"
    ]  # fmt: skip


@pytest.mark.parametrize("value", [b"1700000000.250000", "1700000000.250000"])
def test_published_at_reads_back_what_entry_wrote(value: bytes | str) -> None:
    assert ledger.published_at(value) == 1700000000.25
    assert ledger.published_at(ledger.entry(manifest())[ledger.PUBLISHED_AT]) == 1700000000.25


@pytest.mark.parametrize("value", [None, b"", ""])
def test_a_missing_publish_time_is_none(value: bytes | str | None) -> None:
    assert ledger.published_at(value) is None


def test_a_malformed_publish_time_raises_a_value_error() -> None:
    with pytest.raises(ValueError, match="malformed ledger published_at"):
        ledger.published_at(b"soon")
