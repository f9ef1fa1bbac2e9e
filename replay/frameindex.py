"""Frame-index sample replies, shard side: which frames a pixel batch carries, and where.

Place in the data flow: replay/server.py answers a `unique_frames` sample of a pixel table
through Table.gather_frames (replay/table.py), which hands the items' obs and next_obs
stacks (frame slots of its FrameStore, replay/frames.py) to `gather`; the frames and the
per-item indexes it writes go out in one packed reply (replay/packed.py), and `rebuild`
there turns them back into stacks on the learner.
"""

from __future__ import annotations

import numpy as np

from canopy.replay.frames import FrameStore


def gather(
    store: FrameStore,
    obs: np.ndarray,
    nxt: np.ndarray,
    obs_index: np.ndarray,
    next_index: np.ndarray,
    frames: np.ndarray,
) -> int:
    """The frames of the obs and next_obs stacks [n, stack] into `frames` (room for every
    frame of those stacks), and each item's stacks as indexes into them, into `obs_index`
    and `next_index`; returns how many frames went in.

    `frames[obs_index]` is what `store.gather(obs)` returns (likewise for next_obs),
    episode starts included (a padded stack names its repeated frame each time). Two layouts:
    - windows, when every item's next_obs stack is its obs stack moved on by one frame
      (what an actor's transitions are): each item's stack + 1 frames in a row, obs
      indexing the first `stack` of them and next_obs the last. The client then views
      both stacks in the received frames (packed.rebuild) instead of copying them out.
    - otherwise each distinct frame once.
    """
    k = obs.shape[1]
    if np.array_equal(obs[:, 1:], nxt[:, :-1]):
        n = len(obs)
        windows = np.concatenate([obs, nxt[:, -1:]], axis=1)
        runs = np.arange(0, n * (k + 1), k + 1, dtype=np.int32)[:, None] + np.arange(k, dtype=np.int32)
        obs_index[:] = runs
        next_index[:] = runs + 1
        store.gather(windows, out=frames[: n * (k + 1)].reshape(n, k + 1, *frames.shape[1:]))
        return n * (k + 1)
    both = np.concatenate([obs, nxt], axis=1)  # [n, 2 * stack]: one sort finds every repeat
    unique, inverse = np.unique(both, return_inverse=True)
    inverse = inverse.reshape(both.shape)
    obs_index[:] = inverse[:, :k]
    next_index[:] = inverse[:, k:]
    store.gather(unique, out=frames[: len(unique)])
    return len(unique)
