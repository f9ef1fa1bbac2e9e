"""cache/codecs.py error bounds and byte savings; cache/shm.py double-buffered host copy."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from canopy.cache import blob, codecs
from canopy.cache.shm import ShmReader, ShmWriter
from canopy.errors import ProtocolError
from canopy.version import Version


def weights(seed: int, drift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {
        "layers.0.weight": rng.normal(size=(256, 64)).astype(np.float32),
        "layers.0.bias": rng.normal(size=256).astype(np.float32),
        "layers.1.weight": rng.normal(size=(4, 256)).astype(np.float32),
        "layers.1.bias": np.zeros(4, np.float32),
    }
    step = np.random.default_rng(seed)
    return {k: (v + drift * step.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}


def test_bf16_keeps_every_element_within_its_relative_error_bound_at_half_the_bytes() -> None:
    state = weights(1)
    manifest, chunks = blob.pack(state, Version(1, 1), "mlp", 7, encoder=codecs.Encoder("bf16"))
    out = blob.unpack(manifest, chunks)
    assert manifest.codec == "bf16" and manifest.size * 2 == manifest.decoded_size
    for name, a in state.items():
        np.testing.assert_array_less(np.abs(out[name] - a), np.abs(a) * 2.0**-8 + 1e-30)


def test_int8delta_error_is_at_most_half_a_step_and_never_accumulates_over_versions() -> None:
    enc = codecs.Encoder("int8delta", levels=256, keyframe_every=8)
    keyframe = None
    for step in range(20):
        state = weights(step, drift=0.01 * step)
        manifest, chunks = blob.pack(state, Version(3, step), "mlp", 7, encoder=enc)
        if manifest.codec == "raw":
            keyframe = blob.decode(manifest, chunks)
            assert step % 8 == 0
            continue
        assert manifest.base == f"3.{step - step % 8}"
        out = blob.unpack(manifest, chunks, base=keyframe)
        _, ranges = blob._delta_params(manifest)
        for (name, a), (_lo, s) in zip(state.items(), ranges, strict=True):
            # Documented bound: s / 2 plus float32 rounding of the sum.
            bound = s / 2 + 4 * np.finfo(np.float32).eps * (np.abs(a).max() + 1)
            assert np.abs(out[name] - a).max() <= bound, name


def test_int8delta_bytes_are_under_30_percent_of_raw_with_keyframes_every_16() -> None:
    enc = codecs.Encoder("int8delta", keyframe_every=16)
    sent = raw = 0
    for step in range(64):
        manifest, _ = blob.pack(weights(step, 0.01), Version(1, step), "mlp", 0, encoder=enc)
        sent += manifest.size
        raw += manifest.decoded_size
    assert sent / raw <= 0.30


def test_a_delta_decoded_against_the_wrong_keyframe_is_refused() -> None:
    enc = codecs.Encoder("int8delta", keyframe_every=4)
    m0, c0 = blob.pack(weights(0), Version(1, 0), "mlp", 0, encoder=enc)
    m1, c1 = blob.pack(weights(1, 0.05), Version(1, 1), "mlp", 0, encoder=enc)
    wrong = blob.decode(*blob.pack(weights(9, 0.5), Version(1, 0), "mlp", 0))
    with pytest.raises(ProtocolError, match="decoded digest"):
        blob.unpack(m1, c1, base=wrong)
    with pytest.raises(ProtocolError, match="keyframe"):
        blob.unpack(m1, c1, base=None)
    assert blob.unpack(m1, c1, base=blob.decode(m0, c0))


def test_a_manifest_with_bad_delta_params_is_a_protocol_error() -> None:
    enc = codecs.Encoder("int8delta", keyframe_every=4)
    blob.pack(weights(0), Version(1, 0), "mlp", 0, encoder=enc)
    m1, _ = blob.pack(weights(1, 0.05), Version(1, 1), "mlp", 0, encoder=enc)
    fields = m1.to_fields()
    for bad in ('{"levels": 999, "ranges": []}', "nope", '{"levels": 256, "ranges": [[0, -1]]}'):
        with pytest.raises(ProtocolError):
            blob.Manifest.from_fields({**fields, "params": bad})


@pytest.fixture
def ring():
    tag = f"test-{uuid.uuid4().hex[:8]}"
    size = blob.pack(weights(0), Version(1, 0), "mlp", 0)[0].size
    writer = ShmWriter(tag, size, slots=3, max_readers=4)
    try:
        yield writer
    finally:
        writer.close()


def publish(writer: ShmWriter, step: int) -> tuple[Version, dict[str, np.ndarray], bool]:
    state = weights(step, 0.1)
    manifest, chunks = blob.pack(state, Version(1, step), "mlp", 0)
    return manifest.version, state, writer.publish(manifest, blob.decode(manifest, chunks))


def test_a_reader_gets_read_only_views_of_the_one_host_copy(ring: ShmWriter) -> None:
    v, state, ok = publish(ring, 1)
    reader = ShmReader(ring.tag, ring.take_reader())
    manifest, arrays = reader.take(v)
    assert ok and manifest.version == v
    for name, a in state.items():
        np.testing.assert_array_equal(arrays[name], a)
        assert not arrays[name].flags.writeable
    with pytest.raises(ValueError):
        arrays["layers.0.bias"][0] = 1.0
    reader.close()


def test_a_pinned_version_is_never_overwritten_and_the_writer_skips_instead(ring: ShmWriter) -> None:
    v1, s1, _ = publish(ring, 1)
    reader = ShmReader(ring.tag, ring.take_reader())
    _, held = reader.take(v1)
    reader.acting(v1)
    results = [publish(ring, step) for step in range(2, 8)]
    # v1 stays intact in its slot while pinned, whatever came after it.
    for name, a in s1.items():
        np.testing.assert_array_equal(held[name], a)
    assert all(ok for _, _, ok in results)  # two other slots keep turning over
    # Pin the other non-current slot as well: nothing is free, so the writer must skip.
    second, s2, _ = results[-2]
    other = ShmReader(ring.tag, ring.take_reader())
    _, held2 = other.take(second)
    other.acting(second)
    before = ring.skipped_total
    assert publish(ring, 9)[2] is False
    assert ring.skipped_total == before + 1
    for held_arrays, state in ((held, s1), (held2, s2)):
        for name, a in state.items():
            np.testing.assert_array_equal(held_arrays[name], a)
