"""Streamed version replies (cut-through): each chunk is checked on arrival, in order, and
anything out of place is refused before it could be passed on."""

from __future__ import annotations

import numpy as np
import pytest

from canopy import wire
from canopy.cache import blob, protocol
from canopy.errors import ProtocolError
from canopy.version import Version


def version(step: int = 1, rows: int = 100_000) -> tuple[blob.Manifest, list[bytes]]:
    rng = np.random.default_rng(step)
    state = {"layers.0.weight": rng.normal(size=(rows, 4)).astype(np.float32)}
    return blob.pack(state, Version(1, step), "mlp", 0)


def test_an_assembly_completes_chunk_by_chunk_and_gives_back_the_payload() -> None:
    manifest, chunks = version()
    assert manifest.chunks >= 2 and len(manifest.chunk_digests) == manifest.chunks
    a = protocol.Assembly()
    done = [a.feed(m) for m in protocol.version_messages(manifest, chunks)]
    assert done == [False] * manifest.chunks + [True]
    assert a.manifest is not None and a.manifest.digest == manifest.digest
    assert blob.check_payload(manifest, a.chunks) == b"".join(chunks)


def test_a_chunk_with_a_wrong_digest_is_refused_on_arrival() -> None:
    manifest, chunks = version()
    bad = bytearray(chunks[1])
    bad[0] ^= 1
    a = protocol.Assembly()
    messages = protocol.version_messages(manifest, [chunks[0], bytes(bad), *chunks[2:]])
    a.feed(messages[0])
    a.feed(messages[1])
    with pytest.raises(ProtocolError, match="chunk 1 digest mismatch"):
        a.feed(messages[2])
    assert a.manifest is None  # reset: nothing of it is passed on


def test_a_chunk_out_of_order_is_refused_and_a_stale_one_ignored() -> None:
    manifest, chunks = version()
    other, other_chunks = version(step=2)
    a = protocol.Assembly()
    a.feed(protocol.version_header(manifest))
    assert a.feed(protocol.chunk_message(other.version, 0, other_chunks[0])) is False  # stale
    assert a.chunks == []
    with pytest.raises(ProtocolError, match="out of order"):
        a.feed(protocol.chunk_message(manifest.version, 1, chunks[1]))


def test_an_error_reply_ends_the_assembly_with_its_message() -> None:
    a = protocol.Assembly()
    with pytest.raises(ProtocolError, match="unknown_version: gone"):
        a.feed(wire.error_reply("unknown_version", "gone"))


def test_a_manifest_whose_chunk_digests_do_not_match_its_chunks_is_refused() -> None:
    manifest, _ = version()
    fields = manifest.to_fields() | {"chunk_digests": '["abc"]'}
    with pytest.raises(ProtocolError, match="chunk digests"):
        blob.Manifest.from_fields(fields)
