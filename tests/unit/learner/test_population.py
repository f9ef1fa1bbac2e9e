"""learner/algorithms/population.py: several DQN models trained as one algorithm (`learner.models`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from canopy import config as config_mod
from canopy.actors.policy import member_arrays, policy_from_arrays, population_arrays
from canopy.config import Config, LearnerConfig, to_dict
from canopy.envs import EnvSpec
from canopy.errors import ConfigError, ProtocolError
from canopy.learner import algorithms
from canopy.learner.algorithms.dqn import DQN, Batch
from canopy.learner.algorithms.population import Population
from canopy.learner.checkpoint.state import Capturer, Snapshot, restore

OBS, ACTIONS = 4, 2
SPEC = EnvSpec(obs_shape=(OBS,), obs_dtype="float32", discrete=True, actions=ACTIONS)


def build(seed: int, rates: list[float]) -> Population:
    torch.manual_seed(seed)
    # lr annealed over 6 updates: a checkpoint taken halfway must carry every model's schedule.
    cfg = LearnerConfig(
        hidden=[16, 16],
        models=len(rates),
        model_lr=rates,
        target_update_period=3,
        lr_anneal_updates=6,
        lr_final=1e-4,
    )
    built = algorithms.make(SPEC, cfg, torch.device("cpu"))
    assert isinstance(built.algorithm, Population) and built.arch == "mlp"
    return built.algorithm


def batches(seed: int, models: int, n: int = 32) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(
            obs=torch.randn(n, OBS, generator=g),
            action=torch.randint(0, ACTIONS, (n,), generator=g),
            reward=torch.randn(n, generator=g),
            next_obs=torch.randn(n, OBS, generator=g),
            discount=torch.full((n,), 0.97),
        )
        for _ in range(models)
    ]


def flat(algo: Population | DQN) -> torch.Tensor:
    tensors = [*algo.online.state_dict().values(), *algo.target.state_dict().values()]
    for st in algo.optimizer.state_dict()["state"].values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return torch.cat([t.reshape(-1).float() for t in tensors])


def test_each_model_trains_exactly_as_it_would_alone_with_its_own_learning_rate() -> None:
    pop = build(0, [1e-3, 3e-2])
    alone = [copy.deepcopy(m) for m in pop.members]
    for step in range(7):  # past two target-network copies
        bs = batches(step, 2)
        stats = pop.update(bs)
        for m, b in zip(alone, bs, strict=True):
            m.update(b)
        # Each model's loss as "m<k>/loss", 0-d tensors like the mean's (no host sync).
        assert list(stats) == ["loss", "q_mean", "m0/loss", "m1/loss"]
        assert all(v.shape == () for v in stats.values())
    assert pop.updates == 7
    for m, ref in zip(pop.members, alone, strict=True):
        assert torch.equal(flat(m), flat(ref))
    a, b = (np.concatenate([v.ravel() for v in m.export().values()]) for m in pop.members)
    assert not np.allclose(a, b), "two models with different rates and inits ended up alike"
    assert [len(td) for td in pop.last_td_error] == [32, 32]
    assert [len(td) for td in pop.priorities()] == [32, 32]


def test_a_population_checkpoint_restores_and_continues_bit_for_bit() -> None:
    pop = build(1, [1e-3, 2e-3, 5e-3])
    for step in range(4):
        pop.update(batches(step, 3))
    lrs = [g["lr"] for g in pop.optimizer.state_dict()["param_groups"]]
    assert lrs == pytest.approx([r - 4 / 6 * (r - 1e-4) for r in (1e-3, 2e-3, 5e-3)])
    snap = Capturer().capture(pop, {"epoch": 2}, to_dict(Config()))
    meta, data = snap.meta_bytes(), bytes(snap.flat.numpy())
    for step in range(4, 9):
        pop.update(batches(step, 3))

    fresh = build(99, [1e-3, 2e-3, 5e-3])
    counters = restore(fresh, Snapshot.from_bytes(meta, data))
    assert counters["updates"] == 4 and fresh.updates == 4
    assert [g["lr"] for g in fresh.optimizer.state_dict()["param_groups"]] == lrs
    for step in range(4, 9):
        fresh.update(batches(step, 3))
    assert torch.equal(flat(fresh), flat(pop))


def test_a_population_version_gives_each_actor_its_model_and_a_working_policy() -> None:
    pop = build(2, [1e-3, 1e-3, 1e-3])
    arrays = pop.export()
    assert list(arrays)[:2] == ["m0/layers.0.weight", "m0/layers.0.bias"]
    models = population_arrays(arrays)
    assert len(models) == 3
    for ident in range(7):
        k, mine = member_arrays(arrays, ident)
        assert k == ident % 3
        assert mine.keys() == pop.members[k].export().keys()
        q = policy_from_arrays("mlp", mine).q_values(np.zeros((5, OBS), np.float32))
        assert q.shape == (5, ACTIONS)
    # A single model's version is its own population of one.
    single = pop.members[0].export()
    assert member_arrays(single, 5) == (0, single)


@pytest.mark.parametrize(
    "names",
    [["m0/a.weight", "x1/a.weight"], ["m0/a.weight", "m2/a.weight"], ["m0/", "m1/a"], ["m0/a", "mx/a"]],
)
def test_a_malformed_population_version_is_rejected(names: list[str]) -> None:
    with pytest.raises(ProtocolError):
        population_arrays({n: np.zeros(2, np.float32) for n in names})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.models=2", "learner.model_lr=[1e-3]"], "1 rates for learner.models = 2"),
        (["learner.models=2", "learner.model_lr=[1e-3, -1.0]"], "must be positive"),
        (["learner.models=2", 'learner.algorithm="td3"'], "dqn populations only"),
        (["learner.models=0"], "learner.models = 0 is too small"),
    ],
)
def test_population_settings_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, overrides)
