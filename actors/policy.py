"""The actor's local copy of the policy: the Q-network's forward pass in numpy.

Actors only ever run inference on small batches, where numpy beats torch's per-op
overhead, and staying torch-free keeps an actor process cheap to start (no 1.5 s import,
~100 MB less memory), which matters at thousands of actors. The weights arrive as named
float32 arrays from the cache tree; the learner's `mlp` architecture is a stack of
linear layers `layers.<i>.weight/bias` with ReLU between them.
"""

from __future__ import annotations

import itertools

import numpy as np

from cluster.errors import ProtocolError


class MLPPolicy:
    """Example:
    policy = MLPPolicy.from_arrays("mlp", arrays)
    q = policy.q_values(obs)  # [batch, actions]
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]]):
        self.layers = layers

    @classmethod
    def from_arrays(cls, arch: str, arrays: dict[str, np.ndarray]) -> MLPPolicy:
        if arch != "mlp":
            raise ProtocolError(f"actors cannot run architecture {arch!r}")
        names = list(arrays)
        if len(names) % 2 or not names:
            raise ProtocolError("an mlp needs weight/bias pairs")
        layers = []
        for w_name, b_name in zip(names[::2], names[1::2], strict=True):
            w, b = arrays[w_name], arrays[b_name]
            if (
                not (w_name.endswith(".weight") and b_name.endswith(".bias"))
                or w.ndim != 2
                or b.shape != (w.shape[0],)
            ):
                raise ProtocolError(f"bad mlp layer {w_name} {w.shape} / {b_name} {b.shape}")
            # No copy: the arrays may be read-only views on the host's shared copy (cache/shm.py),
            # and thousands of actors must not each hold their own. `w.T` is a view too.
            layers.append((np.asarray(w, dtype=np.float32).T, np.asarray(b, dtype=np.float32)))
        for (w0, _), (w1, _) in itertools.pairwise(layers):
            if w0.shape[1] != w1.shape[0]:
                raise ProtocolError("mlp layer sizes do not chain")
        return cls(layers)

    @property
    def in_features(self) -> int:
        return self.layers[0][0].shape[0]

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        x = obs.reshape(len(obs), -1).astype(np.float32, copy=False)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b  # allocates a fresh x: the shared weights are never written
            if i < len(self.layers) - 1:
                np.maximum(x, 0, out=x)
        return x


def epsilon_ladder(slot: int, slots: int, base: float, alpha: float) -> float:
    """Ape-X exploration: slot i of N explores with eps = base ** (1 + alpha * i / (N - 1))."""
    if slots == 1:
        return base
    return base ** (1 + alpha * slot / (slots - 1))
