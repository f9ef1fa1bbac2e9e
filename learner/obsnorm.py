"""Observation normalization (`env.normalize_obs`): running statistics kept by the learner,
folded into the policy it publishes.

Place in the data flow: replay batch -> `ObsNorm.update` (the observations of every batch
the learner trains on) -> `ObsNorm.normalize` of obs and next_obs -> the networks. At
publish time `fold` turns the current statistics into extra first layers of the exported
MLP, so a published version is still a plain `mlp` / `tanh_mlp` / `categorical_mlp` /
`gaussian_mlp` / `squashed_gaussian_mlp` acting on raw observations (arrays other than the
layers, like a `gaussian_mlp`'s `log_std`, pass through unchanged; a squashed Gaussian's
log std is an output of the last layer, which the fold leaves as it is): actors, the
evaluator, `canopy export` and `canopy eval` need nothing new, and they always act with
the statistics the published weights were trained with (one version, one set of statistics).

Statistics: count, mean and variance of every observation element in float64, merged
batch by batch with the parallel-variance formula of Chan et al. (1979), as SB3's
RunningMeanStd / VecNormalize do; the network sees
    z = clip((x - mean) / sqrt(var + 1e-8), -10, 10).
Before any data: mean 0, var 1 (z = clip(x, -10, 10)).

The fold reproduces the clip exactly, with one ReLU layer of width 2d (d = observation
size) in front of the network, since clip(z, -c, c) = relu(z + c) - relu(z - c) - c:
    layer 0: h = relu(A x + a),  A = [diag(1/std); diag(1/std)],  a = [c - mean/std; -c - mean/std]
    layer 1: W0 (h_top - h_bottom - c) + b0 = [W0, -W0] h + (b0 - c W0 1)
followed by the network's own layers 1.. renumbered 2... A plain affine fold into the first
layer (W0 / std, b0 - W0 mean / std) would be smaller but would drop the clip: actors would
then act on inputs of up to thousands of standard deviations (an element that was constant
for a long time and starts to move) that the learner only ever saw clipped at 10. The cost
is small for the flat observations this is for: 2d x d + h x 2d weights in place of h x d.
Precision: actors compute the folded layers in float32, so an element with |mean| / std
around 1e5 comes out with an error of ~0.01 in normalized units (float32 observations
themselves stop resolving such an element near 1e7). Lossy cache codecs (`cache.codec`
bf16, int8delta) quantize the folded layers like any other, and these elements again
lose the most: keep `raw` for observations with large offsets.

The statistics live in the learner's checkpoint as plain counters (`state` / `load`:
float64 bytes in the msgpack metadata, no pickle). In a data-parallel group every rank
updates them from its own batches (they differ by sampling noise only; parameters stay
identical because gradients are averaged); rank 0 publishes and checkpoints its own, and
the group starts from rank 0's when it forms.

Example:
    norm = ObsNorm(4, torch.device("cpu"))
    norm.update(batch_obs)
    z = norm.normalize(batch_obs)
    arrays = norm.fold(algo.export())  # publish these
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from canopy.arch import FOLDABLE
from canopy.config import EnvConfig
from canopy.envs import EnvSpec
from canopy.errors import ConfigError, ProtocolError

EPSILON = 1e-8
CLIP = 10.0


class ObsNorm:
    """Running mean and variance of flat observations, on the learner's device (no host syncs)."""

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.count = 0  # a Python int: the batch size is known without asking the device
        self.mean = torch.zeros(size, dtype=torch.float64, device=device)
        self.var = torch.ones(size, dtype=torch.float64, device=device)

    @classmethod
    def for_learner(cls, env: EnvConfig, spec: EnvSpec, arch: str, device: torch.device) -> ObsNorm | None:
        """The learner's normalizer when `env.normalize_obs` is set, else None.

        Raises ConfigError when the network is not an MLP (pixel observations): the fold
        needs a first linear layer on the flat observation.
        """
        if not env.normalize_obs:
            return None
        if arch not in FOLDABLE:
            raise ConfigError(
                [
                    f"env.normalize_obs needs flat observations; {env.id} gives {spec.obs_dtype} "
                    f"{spec.obs_shape} frames ({arch} network): set env.normalize_obs = false"
                ]
            )
        return cls(int(np.prod(spec.obs_shape)), device)

    @torch.no_grad()
    def update(self, obs: torch.Tensor) -> None:
        """Merge a batch of observations [batch, ...] into the statistics."""
        x = obs.reshape(len(obs), -1).double()
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)
        batch_var = x.var(dim=0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta.square() * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.var = m2 / total
        self.count = total

    @torch.no_grad()
    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """clip((obs - mean) / std, -10, 10) as float32, in the shape of `obs`."""
        x = obs.reshape(len(obs), -1).double()
        z = ((x - self.mean) / torch.sqrt(self.var + EPSILON)).clamp_(-CLIP, CLIP)
        return z.float().reshape(obs.shape)

    def fold(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Exported arrays (one model, or a population's `m<k>/...`) extended to act on raw obs."""
        mean = self.mean.cpu().numpy()
        std = np.sqrt(self.var.cpu().numpy() + EPSILON)
        return fold(arrays, mean, std)

    def state(self) -> dict[str, Any]:
        """Checkpoint counters: msgpack-able, float64 values as little-endian bytes."""
        return {
            "count": self.count,
            "mean": self.mean.cpu().numpy().astype("<f8").tobytes(),
            "var": self.var.cpu().numpy().astype("<f8").tobytes(),
        }

    def load(self, state: Any) -> None:
        """Put `state()` back; raises ProtocolError on anything that does not fit this env."""
        try:
            count = int(state["count"])
            mean = np.frombuffer(state["mean"], dtype="<f8")
            var = np.frombuffer(state["var"], dtype="<f8")
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"checkpoint obs_norm state is malformed: {exc}") from None
        if count < 0 or mean.shape != (self.size,) or var.shape != (self.size,) or (var < 0).any():
            raise ProtocolError(
                f"checkpoint obs_norm state holds {mean.size} means for {self.size} observation elements"
            )
        device = self.mean.device
        self.count = count
        self.mean = torch.tensor(mean, dtype=torch.float64, device=device)
        self.var = torch.tensor(var, dtype=torch.float64, device=device)


def fold(
    arrays: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray, clip: float = CLIP
) -> dict[str, np.ndarray]:
    """An MLP's arrays (`layers.<i>.weight/bias` in layer order, optionally under population
    prefixes `m<k>/`) with normalization and clipping prepended as described above; other
    arrays of a model (a `gaussian_mlp`'s `log_std`) are kept as they are, after its layers."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        prefix, slash, rest = name.rpartition("/")
        groups.setdefault(prefix + slash, {})[rest] = array
    return {
        prefix + name: array
        for prefix, layers in groups.items()
        for name, array in _fold_one(layers, mean, std, clip).items()
    }


def _fold_one(
    layers: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray, clip: float
) -> dict[str, np.ndarray]:
    w0, b0 = layers.get("layers.0.weight"), layers.get("layers.0.bias")
    d = len(mean)
    if w0 is None or b0 is None or w0.ndim != 2 or w0.shape[1] != d:
        raise ValueError(f"obs normalization folds into an mlp whose layers.0 takes {d} inputs")
    w0, b0 = w0.astype(np.float64), b0.astype(np.float64)
    inv = 1.0 / std.astype(np.float64)
    shift = mean * inv
    out = {
        "layers.0.weight": np.concatenate([np.diag(inv), np.diag(inv)]),
        "layers.0.bias": np.concatenate([clip - shift, -clip - shift]),
        "layers.1.weight": np.concatenate([w0, -w0], axis=1),
        "layers.1.bias": b0 - clip * w0.sum(axis=1),
    }
    others: dict[str, np.ndarray] = {}
    for name, array in layers.items():
        prefix, index, kind = [*name.split("."), "", ""][:3]
        if prefix != "layers" or not index.isdigit() or name.count(".") != 2:
            # Not a linear layer's (a gaussian_mlp's state-independent log_std): it never
            # sees the observation, so normalization leaves it alone.
            others[name] = array
            continue
        # Every layer moves one on; layer 0's weight and bias are replaced above, but its
        # layer norm (`norm_weight/norm_bias`) acts on the same outputs, now layer 1's.
        if index != "0" or kind.startswith("norm_"):
            out[f"layers.{int(index) + 1}.{kind}"] = array
    out.update(others)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
