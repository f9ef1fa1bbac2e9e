"""learner/role.py `_Trainer`: the one training loop of the lease holder and its followers,
with stand-ins for the replay sample client, the learner group and the lease holder's part."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
import torch

from canopy.config import Config, LearnerConfig, ReplayConfig
from canopy.envs import EnvSpec
from canopy.learner import algorithms
from canopy.learner.model import Model
from canopy.learner.role import LAG_BINS, TRAINING_STATS, _Trainer, lag_quantiles
from canopy.replay.client import TensorBatch
from canopy.version import Version

CPU = torch.device("cpu")
DISCRETE = EnvSpec(obs_shape=(4,), obs_dtype="float32", actions=2, discrete=True)
BOX = EnvSpec(obs_shape=(3,), obs_dtype="float32", actions=1, discrete=False)
N = 8  # items per batch


class Sampler:
    """`count` batches, then the stream ends (as a sampler does once `stop` is set)."""

    def __init__(self, spec: EnvSpec, count: int):
        self.spec, self.count = spec, count
        self.shards = ["shard-0"]
        self.rng = np.random.default_rng(0)
        self.batches = 0
        self.not_ready_total = 0
        self.sent: list[tuple[np.ndarray, np.ndarray]] = []
        self.closed = False

    def tensor_batches(self, device: torch.device, timeout: float, stop: threading.Event, names=()):
        obs = self.spec.obs_shape[0]
        for i in range(self.count):
            if stop.is_set():
                return
            self.batches += 1
            if "mask" in names:
                yield unroll_batch(self.spec, i)
                continue
            action = (
                torch.randint(0, self.spec.actions, (N,))
                if self.spec.discrete
                else torch.rand(N, self.spec.actions) * 2 - 1
            )
            tensors = {
                "obs": torch.randn(N, obs),
                "action": action,
                "reward": torch.randn(N),
                "next_obs": torch.randn(N, obs),
                "discount": torch.full((N,), 0.9),
                "weight": torch.ones(N),
            }
            arrays = {
                "shard": np.zeros(N, np.int64),
                "slot": np.arange(N) + N * i,
                "gen": np.zeros(N, np.int64),
                "version": np.full(N, (1 << 32) | 3, np.int64),  # epoch 1, step 3
            }
            yield TensorBatch(tensors, arrays)

    def update_priorities(
        self, shard: object, slots: np.ndarray, gens: np.ndarray, prios: np.ndarray
    ) -> None:
        self.sent.append((slots, prios))

    def close(self) -> None:
        self.closed = True


def unroll_batch(spec: EnvSpec, i: int, b: int = 4, t: int = 8) -> TensorBatch:
    """Unrolls whose first steps were acted on by versions 1.3 .. 1.(3 + b - 1)."""
    acted = (1 << 32) | (3 + np.arange(b, dtype=np.int64))
    tensors = {
        "obs": torch.randn(b, t + 1, spec.obs_shape[0]),
        "action": torch.randint(0, spec.actions, (b, t)),
        "reward": torch.ones(b, t),
        "terminated": torch.zeros(b, t),
        "truncated": torch.zeros(b, t),
        "mask": torch.ones(b, t),
        "logp": torch.full((b, t), -0.69),
        "version": torch.from_numpy(np.repeat(acted[:, None], t, axis=1)),
    }
    return TensorBatch(tensors, {"version": tensors["version"].numpy()})


class Group:
    """One rank's view of the group's control all-reduce: halts after `halt_after` steps,
    rank 0 asks for a checkpoint at step `checkpoint_at`."""

    def __init__(self, halt_after: int, checkpoint_at: int):
        self.halt_after, self.checkpoint_at, self.steps = halt_after, checkpoint_at, 0

    def control(self, stop: bool, checkpoint: bool) -> tuple[bool, bool]:
        self.steps += 1
        return stop or self.steps > self.halt_after, checkpoint or self.steps == self.checkpoint_at

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        return [payload, b'{"rank": 1}']


class Lead:
    version = Version(1, 10)

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, list[bytes]]] = []

    def checkpoint_due(self) -> bool:
        return False  # in a group the control step decides (Group.checkpoint_at)

    def after_update(self, checkpoint_now: bool, sampler: Sampler, rank_states: list[bytes]) -> None:
        self.calls.append((len(self.calls) + 1, checkpoint_now, rank_states))


def trainer(spec: EnvSpec, cfg: LearnerConfig, batches: int, prioritized: bool) -> tuple[_Trainer, Sampler]:
    torch.manual_seed(0)
    built = algorithms.make(spec, cfg, CPU)
    sampler = Sampler(spec, batches)
    members = SimpleNamespace(close=lambda: None)
    model = Model(built.algorithm, built.arch, None, CPU)
    full = Config(learner=cfg, replay=ReplayConfig(sampler="prioritized" if prioritized else "uniform"))
    return _Trainer(model, full, (members, sampler), dict(TRAINING_STATS)), sampler


def test_a_population_alone_takes_a_batch_per_model_and_sends_each_models_priorities() -> None:
    cfg = LearnerConfig(hidden=[8], models=2, model_lr=[1e-3, 2e-3])
    t, sampler = trainer(DISCRETE, cfg, batches=101, prioritized=True)  # 50 updates, then one short
    t.run(threading.Event(), group=None, lead=None)
    t.close()
    assert t.algo.updates == 50 and sampler.closed
    assert len(sampler.sent) == 100  # one priority push per batch, every update
    assert all(len(p) == N and (p > 0).all() for _, p in sampler.sent)
    c = t.c
    assert c["updates_total"] == 50 and c["replay_shards"] == 1
    assert type(c["loss"]) is float and type(c["q_mean"]) is float
    assert len(c["model_losses"].split()) == 2
    assert "params_digest" not in c and c["policy_lag_mean"] == 0.0  # no group, no lead


def test_in_a_group_the_loop_halts_with_the_group_and_hands_every_ranks_sampler_state_to_the_lead() -> None:
    t, sampler = trainer(BOX, LearnerConfig(hidden=[8]), batches=1000, prioritized=False)
    lead, group = Lead(), Group(halt_after=50, checkpoint_at=20)
    t.run(threading.Event(), group=group, lead=lead)
    assert t.algo.updates == 50 and not sampler.sent
    assert [n for n, now, _ in lead.calls if now] == [20]
    states = lead.calls[19][2]
    assert json.loads(states[0])["batches"] == 20 and states[1] == b'{"rank": 1}'
    assert all(not states for _, now, states in lead.calls if not now)
    c = t.c
    assert c["params_digest"].startswith("50:")  # every rank reports it at the same update count
    assert c["policy_lag_mean"] == 7.0  # published step 10, data from step 3
    assert "model_losses" not in c


def test_a_follower_stops_as_soon_as_stop_is_set() -> None:
    t, _ = trainer(DISCRETE, LearnerConfig(hidden=[8]), batches=1000, prioritized=False)
    stop = threading.Event()
    stop.set()
    group = Group(halt_after=1000, checkpoint_at=-1)
    t.run(stop, group=group, lead=None)
    assert t.algo.updates == 0 and group.steps == 1  # it told the group, then halted with it


def test_an_on_policy_learner_trains_on_unrolls_and_reports_the_lag_of_every_unroll() -> None:
    cfg = LearnerConfig(algorithm="ppo", hidden=[8], epochs=2, minibatch_size=16)
    torch.manual_seed(0)
    built = algorithms.make(DISCRETE, cfg, CPU)
    sampler = Sampler(DISCRETE, 20)
    model = Model(built.algorithm, built.arch, None, CPU)
    t = _Trainer(
        model, Config(learner=cfg), (SimpleNamespace(close=lambda: None), sampler), dict(TRAINING_STATS)
    )
    t.run(threading.Event(), group=None, lead=Lead())
    assert t.algo.updates == 20 and not sampler.sent  # nothing to prioritize in a queue
    c = t.c
    # Each batch: unrolls from steps 3..6 against published step 10: lags 7, 6, 5, 4.
    assert t.lag_counts[4:8].tolist() == [20, 20, 20, 20] and t.lag_counts.sum() == 80
    assert (c["policy_lag_p50"], c["policy_lag_max"]) == (5.0, 7.0)
    assert type(c["entropy"]) is float and c["loss"] != 0.0


def test_lag_quantiles_read_a_histogram_whose_last_bin_is_the_rest() -> None:
    counts = np.zeros(LAG_BINS, np.int64)
    assert lag_quantiles(counts) == {}
    counts[[0, 2, LAG_BINS - 1]] = [50, 40, 10]
    got = lag_quantiles(counts)
    assert got == {
        "policy_lag_p50": 0.0,
        "policy_lag_p90": 2.0,
        "policy_lag_p99": float(LAG_BINS - 1),
        "policy_lag_max": float(LAG_BINS - 1),
    }
