"""The baselines of `canopy bench checkpoint` (checkpoint.py): the same training state saved
the ways users know, torch.save + fsync to local disk and torch.distributed.checkpoint's
async_save, timed on the training thread as the bench times canopy's capture.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from canopy.cluster.bench import harness


def torch_save(state: dict[str, Any], workdir: Path, trials: int) -> dict[str, Any]:
    """torch.save + fsync of the same state to local disk: the training thread waits for all of it."""
    path = workdir / "baseline.pt"
    saves, loads = [], []
    for _ in range(trials):
        t0 = time.monotonic()
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        saves.append(time.monotonic() - t0)
        t0 = time.monotonic()
        torch.load(path, weights_only=True)
        loads.append(time.monotonic() - t0)
    size = path.stat().st_size
    path.unlink()
    return {"bytes": size, "blocking_ms": harness.ms_summary(saves), "load_ms": harness.ms_summary(loads)}


def dcp_async(state: dict[str, Any], workdir: Path, trials: int) -> dict[str, Any]:
    """torch.distributed.checkpoint.async_save (gloo, world size 1): blocking part and completion."""
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if not hasattr(dcp, "async_save"):
            return {"available": False, "reason": "torch.distributed.checkpoint has no async_save"}
        own_group = not dist.is_initialized()
        if own_group:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        blocking, total = [], []
        try:
            for i in range(trials):
                t0 = time.monotonic()
                fut = dcp.async_save(state, checkpoint_id=str(workdir / f"dcp-{i}"))
                blocking.append(time.monotonic() - t0)
                fut.result(timeout=300)
                total.append(time.monotonic() - t0)
        finally:
            if own_group:
                dist.destroy_process_group()
        return {
            "available": True,
            "blocking_ms": harness.ms_summary(blocking),
            "complete_ms": harness.ms_summary(total),
        }
    except Exception as exc:  # a baseline that cannot run is reported, not fatal
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}
