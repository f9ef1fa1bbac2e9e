"""What every learner rank builds first: the algorithm on its device, and the observation
statistics; and the arrays a published version holds.

Place in the data flow: learner/role.py builds a `Model` (a warm standby keeps one ready),
learner/lead.py publishes `Model.export()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canopy.config import Config
from canopy.envs import env_spec
from canopy.learner import algorithms
from canopy.learner.algorithms import Algorithm
from canopy.learner.obsnorm import ObsNorm


def pick_device(choice: str, rank: int | None = None) -> torch.device:
    """The torch device; with CUDA, rank r of a learner group takes GPU r % device_count."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and rank is not None and torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(choice)


@dataclass
class Model:
    """What every rank builds first: the algorithm on its device, and the observation statistics."""

    algo: Algorithm
    arch: str  # the architecture name published versions carry (actors/policy.py)
    norm: ObsNorm | None  # None unless env.normalize_obs
    device: torch.device

    @classmethod
    def build(cls, cfg: Config, rank: int | None) -> Model:
        """Seed torch, pick the device, and build the configured algorithm and observation statistics."""
        lc = cfg.learner
        torch.manual_seed(cfg.run.seed)
        device = pick_device(lc.device, rank)
        if device.type == "cpu":
            torch.set_num_threads(lc.threads)
        spec = env_spec(cfg.env.id, cfg.env)
        built = algorithms.make(spec, lc, device)
        return cls(
            built.algorithm, built.arch, ObsNorm.for_learner(cfg.env, spec, built.arch, device), device
        )

    def export(self) -> dict:
        """The arrays to publish (see `export`)."""
        return export(self.algo, self.norm)


def export(algo: Algorithm, norm: ObsNorm | None) -> dict:
    """The arrays to publish: with `env.normalize_obs`, the normalization folded in front."""
    return algo.export() if norm is None else norm.fold(algo.export())
