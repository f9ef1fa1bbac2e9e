"""cache/shm.py: versions written chunk by chunk as they arrive, committed whole; the digest
the node checked in the slot header; one mapping and one set of views per process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash
from conftest import mlp_weights

from canopy.cache import blob, shm
from canopy.cache.shm import FIELDS, ShmReader, ShmWriter
from canopy.errors import ProtocolError
from canopy.version import Version


def packed(step: int) -> tuple[blob.Manifest, list[bytes], dict[str, np.ndarray]]:
    state = mlp_weights(step, rows=70_000)
    manifest, chunks = blob.pack(state, Version(1, step), "mlp", 0)
    return manifest, chunks, state


@pytest.fixture
def ring() -> Iterator[ShmWriter]:
    manifest, _, _ = packed(0)
    writer = ShmWriter(f"test-{uuid.uuid4().hex[:8]}", manifest.decoded_size, slots=3, max_readers=4)
    try:
        yield writer
    finally:
        writer.close()


def test_a_version_written_chunk_by_chunk_is_invisible_until_its_commit(ring: ShmWriter) -> None:
    manifest, chunks, state = packed(1)
    assert manifest.chunks >= 2
    reader = ShmReader(ring.tag, ring.take_reader())
    slot = ring.reserve()
    assert slot is not None
    offset = 0
    for c in chunks[:-1]:
        assert ring.write(slot, offset, c)
        offset += len(c)
    assert reader.take(manifest.version) is None  # half written: no reader may see it
    assert ring.write(slot, offset, chunks[-1])
    assert reader.take(manifest.version) is None
    ring.commit(slot, manifest)
    got_manifest, arrays = reader.take(manifest.version)
    assert got_manifest.version == manifest.version
    for name, a in state.items():
        np.testing.assert_array_equal(arrays[name], a)
    reader.close()


def test_a_reader_that_pins_the_old_version_during_the_grace_period_keeps_it(ring: ShmWriter) -> None:
    versions = []
    for step in (1, 2, 3):  # every slot holds a version; slot of 1.1 is the oldest non-current
        manifest, chunks, state = packed(step)
        assert ring.publish(manifest, chunks)
        versions.append((manifest, state))
    (m1, s1) = versions[0]
    reader = ShmReader(ring.tag, ring.take_reader())
    slot = ring.reserve()
    assert slot is not None and ring.slot_version(slot) == 0  # invalid while being rewritten
    # The race the grace period covers: the reader pinned 1.1 just before it was invalidated.
    reader.pins[reader.reader, 1] = m1.version.packed()
    before = ring.skipped_total
    _, chunks4, _ = packed(4)
    assert ring.write(slot, 0, chunks4[0]) is False
    assert ring.skipped_total == before + 1
    assert ring.slot_version(slot) == m1.version.packed()  # given back untouched
    _, arrays = reader.take(m1.version)
    for name, a in s1.items():
        np.testing.assert_array_equal(arrays[name], a)
    reader.close()


def test_an_aborted_slot_stays_invalid_and_is_reused(ring: ShmWriter) -> None:
    m1, c1, _ = packed(1)
    slot = ring.reserve()
    assert slot is not None and ring.write(slot, 0, c1[0])
    ring.abort(slot)
    assert ring.slot_version(slot) == 0 and int(ring.head[3]) == -1  # nothing became current
    assert ring.publish(m1, c1)
    reader = ShmReader(ring.tag, ring.take_reader())
    assert reader.take(m1.version) is not None
    reader.close()


def test_a_slot_whose_checked_digest_is_not_its_manifests_is_refused(ring: ShmWriter) -> None:
    m1, c1, _ = packed(1)
    assert ring.publish(m1, c1)
    slot = int(ring.head[3])
    ring.head[4 + FIELDS * slot + 3] ^= 1  # the header no longer says the node checked these bytes
    reader = ShmReader(ring.tag, ring.take_reader())
    with pytest.raises(ProtocolError):
        reader.take(m1.version)
    reader.close()


def test_the_slot_header_holds_the_digest_the_node_checked(ring: ShmWriter) -> None:
    m1, c1, _ = packed(1)
    assert ring.publish(m1, c1)
    slot = int(ring.head[3])
    assert int(ring.head[4 + FIELDS * slot + 3]) == shm.digest_int(m1.decoded_digest)
    with pytest.raises(ProtocolError):
        shm.digest_int("not hex")


def test_readers_of_one_process_share_the_mapping_and_views_but_not_their_pins(ring: ShmWriter) -> None:
    m1, c1, state = packed(1)
    assert ring.publish(m1, c1)
    a = ShmReader(ring.tag, ring.take_reader())
    b = ShmReader(ring.tag, ring.take_reader())
    assert a.ring is b.ring
    got_a, got_b = a.take(m1.version), b.take(m1.version)
    assert got_a[1] is got_b[1]  # parsed once for the process
    assert not got_a[1]["layers.0.weight"].flags.writeable
    a.acting(m1.version)
    assert ring.pins[a.reader, 0] == m1.version.packed() and ring.pins[b.reader, 0] == 0
    a.close()
    assert ring.pins[a.reader, 0] == 0
    np.testing.assert_array_equal(b.take(m1.version)[1]["layers.0.bias"], state["layers.0.bias"])
    b.close()


def test_a_digest_fed_chunk_by_chunk_on_arrival_is_checked_like_a_whole_one() -> None:
    manifest, chunks, _ = packed(1)
    fed = xxhash.xxh3_64()
    for c in chunks:
        fed.update(c)
    blob.check_chunks(manifest, chunks, fed)
    wrong = xxhash.xxh3_64()
    for c in chunks[::-1]:  # the same bytes in another order
        wrong.update(c)
    with pytest.raises(ProtocolError):
        blob.check_chunks(manifest, chunks, wrong)
