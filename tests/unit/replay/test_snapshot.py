"""Replay snapshots: a shard's tables and limiters survive write -> read -> load unchanged;
damaged or torn snapshots are refused and the previous one is used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from canopy.config import ReplayConfig
from canopy.replay import snapshot
from canopy.replay.server import ReplayServer

CFG = dict(capacity=64, min_size=1, samples_per_insert=2.0, error_buffer=1000.0)


def chunk(n: int, start: int) -> dict[str, np.ndarray]:
    ids = np.arange(start, start + n)
    return {
        "obs": np.repeat(ids[:, None], 4, axis=1).astype(np.float32),
        "action": ids.astype(np.int64),
        "priority": (ids % 7 + 1).astype(np.float64),
    }


def pixel_chunk(keys: list[int], prev: int) -> dict[str, np.ndarray]:
    return {
        "frame": np.stack([np.full((3, 3), k, np.uint8) for k in keys]),
        "frame_key": np.asarray(keys, np.int64),
        "frame_prev": np.asarray([prev, *keys[:-1]], np.int64),
        "obs": np.asarray([prev], np.int64),
        "next_obs": np.asarray([keys[-1]], np.int64),
    }


def filled_server(**cfg: object) -> ReplayServer:
    server = ReplayServer(ReplayConfig(**{**CFG, **cfg}))  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    main = server.tables["main"]
    for start in range(0, 200, 20):  # wraps the 64 slots: evictions, generations > 1
        main.table.insert(chunk(20, start))
        main.limiter.inserted += 20
    s = main.table.sample(16, rng)
    main.limiter.sampled += 16
    main.table.update_priorities(s.slots, s.gens, rng.random(16) * 9)
    pix = server.tables["pix"].table
    pix.insert(pixel_chunk([1, 2, 3], 1))
    pix.insert(pixel_chunk([4, 5], 3))
    return server


def write_one(server: ReplayServer, directory: Path, seq: int) -> Path:
    state, groups = server.snapshot_state()
    return snapshot.write(directory, seq, state, groups)


def assert_same(a: ReplayServer, b: ReplayServer) -> None:
    for name in a.tables:
        ta, tb = a.tables[name].table, b.tables[name].table
        meta_a, arrays_a = ta.export()
        meta_b, arrays_b = tb.export()
        assert meta_a == meta_b
        assert arrays_a.keys() == arrays_b.keys()
        for k in arrays_a:
            np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)
        assert ta.weights() == pytest.approx(tb.weights())
        la, lb = a.tables[name].limiter, b.tables[name].limiter
        assert (la.inserted, la.sampled, la.spi, la.min_diff, la.max_diff) == (
            lb.inserted,
            lb.sampled,
            lb.spi,
            lb.min_diff,
            lb.max_diff,
        )


@pytest.mark.parametrize(
    "sampler,remover", [("prioritized", "fifo"), ("uniform", "min_heap"), ("fifo", "lifo")]
)
def test_a_restored_shard_holds_the_same_tables_limiters_and_priorities(tmp_path, sampler, remover):
    cfg = dict(sampler=sampler, remover=remover, extra_tables=["pix:uniform:fifo"], frame_stack=2)
    a = filled_server(**cfg)
    write_one(a, tmp_path, 1)
    b = ReplayServer(ReplayConfig(**{**CFG, **cfg}), snapshot_dir=tmp_path)
    assert b.restored == tmp_path / "snap-000000000001"
    assert_same(a, b)
    # the restored tables keep working: inserts evict in the same order as before
    for server in (a, b):
        server.tables["main"].table.insert(chunk(10, 1000))
        server.tables["pix"].table.insert(pixel_chunk([6], 5))
    assert_same(a, b)
    got = b.tables["pix"].table.sample(4, np.random.default_rng(0)).arrays
    assert got["obs"].shape == (4, 2, 3, 3)
    assert set(got["next_obs"][:, -1, 0, 0].tolist()) <= {3, 5, 6}


def test_a_damaged_snapshot_is_refused_and_the_previous_one_loads(tmp_path, capsys):
    cfg = dict(extra_tables=["pix:uniform:fifo"])
    a = filled_server(**cfg)
    write_one(a, tmp_path, 1)
    a.tables["main"].table.insert(chunk(5, 500))
    newest = write_one(a, tmp_path, 2)
    victim = next(newest.glob("*.npy"))
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    (tmp_path / ".tmp-000000000003-999999").mkdir()  # a writer that died mid-way: ignored
    b = ReplayServer(ReplayConfig(**{**CFG, **cfg}), snapshot_dir=tmp_path)
    assert b.restored == tmp_path / "snap-000000000001"
    assert "snap-000000000002 rejected" in capsys.readouterr().err
    assert b.tables["main"].table.inserted == 200


def test_a_snapshot_of_other_tables_is_refused_and_the_shard_starts_empty(tmp_path, capsys):
    write_one(filled_server(extra_tables=["pix:uniform:fifo"]), tmp_path, 1)
    b = ReplayServer(ReplayConfig(**{**CFG, "capacity": 32}), snapshot_dir=tmp_path)
    assert b.restored is None
    assert b.tables["main"].table.size == 0
    assert "rejected" in capsys.readouterr().err


def test_the_forked_writer_keeps_the_newest_two(tmp_path):
    server = filled_server(extra_tables=["pix:uniform:fifo"])
    snaps = snapshot.Snapshotter(tmp_path)
    for seq in (1, 2, 3):
        snaps.start(server.snapshot_state)
        outcome = snaps.wait(timeout=60)
        assert outcome is not None and outcome.ok and outcome.seq == seq
    assert [p.name for p in snapshot.snapshots(tmp_path)] == ["snap-000000000003", "snap-000000000002"]
    assert snapshot.Snapshotter(tmp_path).seq == 4
