"""replay/sample.py: sampled arrays handed to torch without needless copies, as a training loop reads them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from canopy.config import ReplayConfig
from canopy.errors import DeadlineExceeded
from canopy.replay.insert import InsertClient
from canopy.replay.sample import TRAIN_FIELDS, SampleClient, to_tensors
from canopy.replay.server import ReplayServer


def batch(n: int = 8) -> dict[str, np.ndarray]:
    return {
        "obs": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
        "action": np.arange(n, dtype=np.int64) % 2,
        "reward": np.ones(n, np.float32),
        "next_obs": np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 1,
        "discount": np.full(n, 0.99, np.float32),
        "weight": np.linspace(0.5, 1.0, n).astype(np.float32),
        "slot": np.arange(n, dtype=np.int64),
    }


def test_cpu_tensors_share_memory_with_the_received_arrays() -> None:
    arrays = batch()
    tensors = to_tensors(arrays, "cpu")
    assert set(tensors) == set(TRAIN_FIELDS)
    for name, t in tensors.items():
        assert t.data_ptr() == arrays[name].ctypes.data, name  # a view, not a copy
        assert t.dtype == torch.from_numpy(arrays[name]).dtype
        np.testing.assert_array_equal(t.numpy(), arrays[name])


def test_read_only_arrays_are_copied_once_rather_than_shared() -> None:
    arrays = batch()
    arrays["obs"].flags.writeable = False
    t = to_tensors(arrays, "cpu", ["obs"])["obs"]
    assert t.data_ptr() != arrays["obs"].ctypes.data
    np.testing.assert_array_equal(t.numpy(), arrays["obs"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_land_on_the_gpu_through_pinned_memory() -> None:
    arrays = batch(256)
    tensors = to_tensors(arrays, "cuda")
    torch.cuda.synchronize()
    for name, t in tensors.items():
        assert t.is_cuda, name
        np.testing.assert_array_equal(t.cpu().numpy(), arrays[name])


def test_a_training_loop_reads_tensor_batches_and_every_wait_has_a_timeout() -> None:
    server = ReplayServer(ReplayConfig(min_size=1, samples_per_insert=0.0, capacity=100))
    endpoint = server.bind("tcp://127.0.0.1:0")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    sampler = SampleClient([endpoint], batch=4, inflight=2)
    inserter = InsertClient(endpoint, inflight=1)
    try:
        with pytest.raises(DeadlineExceeded, match="no replay batch within"):
            next(sampler.tensor_batches("cpu", timeout=0.3))  # nothing inserted yet
        # A stopping learner does not wait out the timeout: the iterator just ends.
        stopping = threading.Event()
        threading.Timer(0.2, stopping.set).start()
        t0 = time.monotonic()
        assert list(sampler.tensor_batches("cpu", timeout=60, stop=stopping)) == []
        assert time.monotonic() - t0 < 10
        arrays = {k: v for k, v in batch(8).items() if k not in ("weight", "slot")}
        inserter.insert({**arrays, "version": np.zeros(8, np.int64)}, timeout=5)
        inserter.flush(timeout=5)
        for _, b in zip(range(3), sampler.tensor_batches("cpu", timeout=5), strict=False):
            assert set(b.tensors) == set(TRAIN_FIELDS)
            assert b.tensors["obs"].shape == (4, 4) and b.tensors["action"].dtype == torch.int64
            assert b.arrays["shard"].tolist() == [0] * 4 and b.arrays["slot"].shape == (4,)
            # Rows hang together: next_obs = obs + 1 and the data is the inserted data.
            assert torch.equal(b.tensors["next_obs"], b.tensors["obs"] + 1)
    finally:
        inserter.close()
        sampler.close()
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
