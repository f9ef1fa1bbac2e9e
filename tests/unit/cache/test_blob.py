"""cache/blob.py: versions as manifest + raw chunks, and every check on the way back in."""

from __future__ import annotations

import json

import numpy as np
import pytest

from canopy.cache import blob
from canopy.cache.blob import Manifest
from canopy.errors import ProtocolError
from canopy.version import Version

V = Version(2, 150)


def state(rows: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layers.0.weight": rng.normal(size=(rows, 4)).astype(np.float32),
        "layers.0.bias": rng.normal(size=rows).astype(np.float32),
        "layers.1.weight": rng.normal(size=(2, rows)).astype(np.float32),
        "layers.1.bias": np.zeros(2, np.float32),
    }


STATES = [
    pytest.param(state(), id="small-mlp-one-chunk"),
    # 300_000 float32 = 1.2 MB: two chunks, the split falls inside the array.
    pytest.param(
        {"big": np.arange(300_000, dtype=np.float32), "tail": np.arange(3, dtype=np.int64)}, id="two-chunks"
    ),
    pytest.param(
        {
            "h": np.linspace(0, 1, 5, dtype=np.float16),
            "i": np.arange(6, dtype=np.int32).reshape(2, 3),
            "u": np.arange(7, dtype=np.uint8),
        },
        id="other-allowed-dtypes",
    ),
    pytest.param({"w": np.arange(12, dtype=np.float32).reshape(3, 4).T}, id="non-contiguous"),
]


@pytest.mark.parametrize("arrays", STATES)
def test_unpack_of_pack_gives_back_every_array_in_order(arrays: dict[str, np.ndarray]) -> None:
    manifest, chunks = blob.pack(arrays, V, arch="mlp", learner=3)

    assert manifest.chunks == len(chunks)
    assert all(len(c) <= blob.CHUNK_BYTES for c in chunks)
    assert manifest.size == sum(a.nbytes for a in arrays.values())
    out = blob.unpack(manifest, chunks)
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype
        np.testing.assert_array_equal(out[name], a)


def test_a_blob_over_one_chunk_is_split_into_chunk_bytes_pieces() -> None:
    manifest, chunks = blob.pack({"big": np.zeros(blob.CHUNK_BYTES // 4 + 1, np.float32)}, V, "mlp", 0)
    assert [len(c) for c in chunks] == [blob.CHUNK_BYTES, 4]
    assert manifest.chunks == 2


def test_manifest_fields_round_trip_through_strings_and_bytes() -> None:
    manifest, _ = blob.pack(state(), V, arch="mlp", learner=3)
    fields = manifest.to_fields()
    assert all(isinstance(v, str) for v in fields.values())
    as_bytes = {k.encode(): v.encode() for k, v in fields.items()}  # as redis-py returns them

    again = Manifest.from_fields(as_bytes)

    assert again.version == V
    assert (again.size, again.digest, again.chunks, again.arch, again.learner) == (
        manifest.size,
        manifest.digest,
        manifest.chunks,
        "mlp",
        3,
    )
    assert again.layout == manifest.layout
    assert again.published_at == pytest.approx(manifest.published_at, abs=1e-5)


def test_a_flipped_byte_is_a_digest_mismatch() -> None:
    manifest, chunks = blob.pack(state(), V, "mlp", 0)
    corrupt = bytearray(chunks[0])
    corrupt[len(corrupt) // 2] ^= 0x01
    with pytest.raises(ProtocolError, match="digest"):
        blob.unpack(manifest, [bytes(corrupt)])


def test_a_missing_or_extra_chunk_is_refused() -> None:
    arrays = {"big": np.arange(300_000, dtype=np.float32)}
    manifest, chunks = blob.pack(arrays, V, "mlp", 0)
    with pytest.raises(ProtocolError, match="chunks"):
        blob.unpack(manifest, chunks[:1])
    with pytest.raises(ProtocolError, match="chunks"):
        blob.unpack(manifest, [*chunks, b""])


def test_chunks_of_the_right_count_but_wrong_total_size_are_refused() -> None:
    manifest, chunks = blob.pack(state(), V, "mlp", 0)
    with pytest.raises(ProtocolError, match="bytes"):
        blob.unpack(manifest, [chunks[0][:-4]])


def fields_with(**changes: object) -> dict[str, str]:
    manifest, _ = blob.pack(state(), V, "mlp", 0)
    fields = manifest.to_fields()
    for key, value in changes.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value if isinstance(value, str) else json.dumps(value)
    return fields


LAYOUT = [
    ["layers.0.weight", "<f4", [8, 4], 0],
    ["layers.0.bias", "<f4", [8], 128],
    ["layers.1.weight", "<f4", [2, 8], 160],
    ["layers.1.bias", "<f4", [2], 224],
]

BAD_MANIFESTS = [
    pytest.param(
        fields_with(layout=[*LAYOUT[:1], ["layers.0.bias", "<f4", [8], 132], *LAYOUT[2:]]), id="gap"
    ),
    pytest.param(
        fields_with(layout=[*LAYOUT[:1], ["layers.0.bias", "<f4", [8], 120], *LAYOUT[2:]]), id="overlap"
    ),
    pytest.param(fields_with(layout=[["layers.0.weight", "|O", [8, 4], 0], *LAYOUT[1:]]), id="object-dtype"),
    pytest.param(fields_with(layout=[["layers.0.weight", ">f4", [8, 4], 0], *LAYOUT[1:]]), id="big-endian"),
    pytest.param(fields_with(layout=LAYOUT[:3]), id="layout-short-of-size"),
    pytest.param(fields_with(layout="not json"), id="layout-not-json"),
    pytest.param(fields_with(layout=[["w", "<f4"]]), id="layout-entry-too-short"),
    pytest.param(fields_with(size="236"), id="size-disagrees-with-layout"),
    pytest.param(fields_with(size="0"), id="zero-size"),
    pytest.param(fields_with(size=str(blob.MAX_BLOB_BYTES + 1)), id="size-over-limit"),
    pytest.param(fields_with(chunks="0"), id="zero-chunks"),
    pytest.param(fields_with(chunks=str(blob.MAX_CHUNKS + 1)), id="too-many-chunks"),
    pytest.param(fields_with(chunks="two"), id="chunks-not-int"),
    pytest.param(fields_with(codec="zstd"), id="unknown-codec"),
    pytest.param(fields_with(version="2"), id="bad-version"),
    pytest.param(fields_with(digest=None), id="missing-digest"),
]


@pytest.mark.parametrize("fields", BAD_MANIFESTS)
def test_a_malformed_manifest_is_a_protocol_error(fields: dict[str, str]) -> None:
    with pytest.raises(ProtocolError):
        Manifest.from_fields(fields)


def test_the_fixture_layout_is_valid_so_each_bad_case_differs_by_one_thing() -> None:
    assert Manifest.from_fields(fields_with(layout=LAYOUT)).size == 232
