"""New priorities from the learner back to the replay shards, without stalling on the GPU.

Place in the data flow: after each update the learner has |TD error| per sampled item on
its device; the shard that served the batch needs them as float64 (addressed by slot and
generation). On CPU they go at once. On CUDA, reading them right away would make the host
wait for the update to finish every step, so the copy goes into pinned memory
asynchronously and is sent one update later, when it has long completed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

PRIORITY_EPS = 1e-3  # keeps every item drawable: a zero priority is never sampled again


class PriorityReturn:
    """Example:
    back = PriorityReturn(sampler, device)
    for td, (shard, slots, gens) in zip(algo.priorities(), batches):  # every update
        back.push(td, shard, slots, gens)
    back.flush()  # at the end
    """

    def __init__(self, sampler: Any, device: torch.device):
        self.sampler, self.cuda = sampler, device.type == "cuda"
        self.pending: tuple[torch.Tensor, torch.cuda.Event, Any, np.ndarray, np.ndarray] | None = None

    def push(self, td: torch.Tensor, shard: Any, slots: np.ndarray, gens: np.ndarray) -> None:
        """Send one batch's |TD errors| to its shard: at once on CPU; on CUDA they are copied to
        pinned memory asynchronously and sent on the next `push` (or `flush`)."""
        if not self.cuda:
            self._send(td.numpy(), shard, slots, gens)
            return
        host = torch.empty(td.shape, dtype=td.dtype, pin_memory=True)
        host.copy_(td, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.flush()
        self.pending = (host, done, shard, slots, gens)

    def flush(self) -> None:
        """Send the priorities still waiting on a device copy, if any."""
        if self.pending is not None:
            host, done, shard, slots, gens = self.pending
            self.pending = None
            done.synchronize()  # the previous update finished long ago: no real wait
            self._send(host.numpy(), shard, slots, gens)

    def _send(self, td: np.ndarray, shard: Any, slots: np.ndarray, gens: np.ndarray) -> None:
        self.sampler.update_priorities(shard, slots, gens, td.astype(np.float64) + PRIORITY_EPS)
