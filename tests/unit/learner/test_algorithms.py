"""learner/algorithms: the `Algorithm` interface every algorithm keeps, and the registry."""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.errors import UserError
from canopy.learner import algorithms
from canopy.learner.algorithms import Algorithm, Batch, Built, Sequences, TrainingState, Unrolls, host_stats
from canopy.learner.algorithms.actor_critic import ActorCritic
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.algorithms.impala import IMPALA
from canopy.learner.algorithms.population import Population
from canopy.learner.algorithms.ppo import PPO
from canopy.learner.algorithms.r2d2 import R2D2
from canopy.learner.algorithms.sac import SAC
from canopy.learner.algorithms.td3 import TD3
from canopy.learner.checkpoint import state as checkpoint_state
from canopy.learner.checkpoint.state import Capturer, Snapshot, restore

CPU = torch.device("cpu")
DISCRETE = EnvSpec(obs_shape=(4,), obs_dtype="float32", actions=2, discrete=True)
BOX = EnvSpec(obs_shape=(3,), obs_dtype="float32", actions=1, discrete=False)
KINDS = {
    "dqn": (DISCRETE, LearnerConfig(hidden=[8], lr_anneal_updates=10)),
    "td3": (BOX, LearnerConfig(hidden=[8], policy_delay=2)),
    "sac": (BOX, LearnerConfig(algorithm="sac", hidden=[8])),
    "population": (DISCRETE, LearnerConfig(hidden=[8], models=2, model_lr=[1e-3, 3e-3])),
    "ppo": (DISCRETE, LearnerConfig(algorithm="ppo", hidden=[8], epochs=2, minibatch_size=24)),
    "ppo_box": (BOX, LearnerConfig(algorithm="ppo", hidden=[8], epochs=2, value_clip=0.2)),
    "impala": (DISCRETE, LearnerConfig(algorithm="impala", hidden=[8], ent_coef=0.01)),
    "impala_box": (BOX, LearnerConfig(algorithm="impala", hidden=[8])),
    "r2d2": (
        DISCRETE,
        LearnerConfig(algorithm="r2d2", hidden=[8, 8], burn_in=2, target_update_period=2, tau=1),
    ),
}
ON_POLICY = [k for k in KINDS if k.startswith(("ppo", "impala"))]


def batch(spec: EnvSpec, seed: int, n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    obs = spec.obs_shape[0]
    if spec.discrete:
        action = torch.randint(0, spec.actions, (n,), generator=g)
    else:
        action = torch.rand(n, spec.actions, generator=g) * 2 - 1
    return Batch(
        torch.randn(n, obs, generator=g),
        action,
        torch.randn(n, generator=g),
        torch.randn(n, obs, generator=g),
        torch.full((n,), 0.9),
    )


def unrolls(spec: EnvSpec, seed: int, b: int = 4, t: int = 8) -> Unrolls:
    """Random unrolls with an episode end inside and a truncated (padded) last unroll."""
    g = torch.Generator().manual_seed(seed)
    if spec.discrete:
        action = torch.randint(0, spec.actions, (b, t), generator=g)
    else:
        action = torch.randn(b, t, spec.actions, generator=g)
    terminated, truncated, mask = torch.zeros(b, t), torch.zeros(b, t), torch.ones(b, t)
    terminated[0, 3] = 1
    truncated[-1, 4], mask[-1, 5:] = 1, 0
    return Unrolls(
        torch.randn(b, t + 1, spec.obs_shape[0], generator=g),
        action,
        torch.randn(b, t, generator=g),
        terminated,
        truncated,
        mask,
        -torch.rand(b, t, generator=g),
        torch.zeros(b, t, dtype=torch.int64),
    )


def sequences(spec: EnvSpec, seed: int, b: int = 16, t: int = 6) -> Sequences:
    """Random r2d2 sequences from random stored states, one ending (terminated) inside."""
    g = torch.Generator().manual_seed(seed)
    terminated, mask = torch.zeros(b, t), torch.ones(b, t)
    terminated[0, 3], mask[0, 4:] = 1, 0
    return Sequences(
        torch.randn(b, t + 1, spec.obs_shape[0], generator=g),
        torch.randint(0, spec.actions, (b, t), generator=g),
        torch.randn(b, t, generator=g) * mask,
        terminated,
        mask,
        (torch.arange(b) % 2).float(),
        torch.randn(b, 8, generator=g),
        torch.randn(b, 8, generator=g),
        torch.rand(b, generator=g),
    )


def update_input(algo: Algorithm, spec: EnvSpec, seed: int) -> Batch | list[Batch] | Unrolls | Sequences:
    """What the learner role hands `update`: one batch, or one per model of a population;
    unrolls for an on-policy algorithm, sequences for r2d2."""
    if isinstance(algo.online, ActorCritic):
        return unrolls(spec, seed)
    if isinstance(algo, R2D2):
        return sequences(spec, seed)
    batches = [batch(spec, 10 * seed + k) for k in range(algo.models)]
    return batches[0] if algo.models == 1 else batches


def build(kind: str, seed: int = 0) -> Algorithm:
    spec, cfg = KINDS[kind]
    torch.manual_seed(seed)
    return algorithms.make(spec, cfg, CPU).algorithm


def protocol_members() -> set[str]:
    names = {n for n, _ in inspect.getmembers(Algorithm, inspect.isfunction) if not n.startswith("_")}
    return names | set(Algorithm.__annotations__)


def test_auto_picks_by_action_space_and_make_returns_the_algorithm_and_the_actors_architecture() -> None:
    dqn = algorithms.make(DISCRETE, LearnerConfig(hidden=[8]), CPU)
    td3 = algorithms.make(BOX, LearnerConfig(hidden=[8]), CPU)
    assert isinstance(dqn, Built) and isinstance(dqn.algorithm, DQN) and dqn.arch == "mlp"
    assert isinstance(td3, Built) and isinstance(td3.algorithm, TD3) and td3.arch == "tanh_mlp"
    assert isinstance(build("population"), Population)
    assert set(algorithms.BUILDERS) == {"dqn", "td3", "sac", "ppo", "impala", "r2d2"}
    r2d2 = algorithms.make(DISCRETE, KINDS["r2d2"][1], CPU)
    assert isinstance(r2d2.algorithm, R2D2) and r2d2.arch == "lstm_q"
    sac = algorithms.make(BOX, KINDS["sac"][1], CPU)
    assert isinstance(sac.algorithm, SAC) and sac.arch == "squashed_gaussian_mlp"
    assert isinstance(build("ppo"), PPO) and isinstance(build("impala_box"), IMPALA)
    assert algorithms.make(DISCRETE, KINDS["ppo"][1], CPU).arch == "categorical_mlp"
    assert algorithms.make(BOX, KINDS["impala_box"][1], CPU).arch == "gaussian_mlp"


@pytest.mark.parametrize(
    ("spec", "cfg", "message"),
    [
        (BOX, LearnerConfig(algorithm="dqn"), 'continuous (Box) actions: set learner.algorithm = "td3"'),
        (DISCRETE, LearnerConfig(algorithm="td3"), 'Discrete actions: set learner.algorithm = "dqn"'),
        (BOX, LearnerConfig(algorithm="td3", models=2), "trains dqn populations only"),
        (DISCRETE, LearnerConfig(algorithm="sac"), 'Discrete actions: set learner.algorithm = "dqn"'),
        (BOX, LearnerConfig(algorithm="sac", models=2), "populations only: set learner.models = 1 for sac"),
        (DISCRETE, LearnerConfig(algorithm="sarsa"), "unknown learner.algorithm 'sarsa'"),
        (DISCRETE, LearnerConfig(algorithm="ppo", models=2), "trains dqn populations only: not ppo"),
        (
            EnvSpec((4, 84, 84), "uint8", 6, True),
            LearnerConfig(algorithm="impala"),
            "impala trains on flat observations",
        ),
        (
            BOX,
            LearnerConfig(algorithm="r2d2"),
            'r2d2 needs Discrete actions: for Box actions set learner.algorithm = "sac"',
        ),
        (
            EnvSpec((4, 84, 84), "uint8", 6, True),
            LearnerConfig(algorithm="r2d2"),
            "lstm_q network takes flat observations",
        ),
    ],
)
def test_a_choice_that_does_not_fit_the_env_is_a_one_line_user_error(
    spec: EnvSpec, cfg: LearnerConfig, message: str
) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        algorithms.make(spec, cfg, CPU)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_algorithm_has_every_member_of_the_interface(kind: str) -> None:
    algo = build(kind)
    missing = {name for name in protocol_members() if not hasattr(algo, name)}
    assert not missing
    assert isinstance(algo.online, nn.Module) and algo.updates == 0
    assert algo.priorities() is None  # nothing to send back before the first update


@pytest.mark.parametrize("kind", list(KINDS))
def test_update_returns_0d_tensors_for_every_algorithm_and_host_stats_reads_them(kind: str) -> None:
    spec = KINDS[kind][0]
    algo = build(kind)
    stats = algo.update(update_input(algo, spec, 0))
    assert algo.updates == 1
    assert "loss" in stats and ("q_mean" in stats or kind in ON_POLICY)
    assert all(isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad for v in stats.values())
    host = host_stats(stats)
    assert list(host) == list(stats) and all(type(v) is float for v in host.values())
    assert all(np.isfinite(v) for v in host.values())
    priorities = algo.priorities()
    if kind in ON_POLICY:  # queue items are read once: nothing to send back
        assert priorities is None
        return
    assert priorities is not None and [p.shape for p in priorities] == [(16,)] * algo.models


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_restored_into_a_fresh_build_makes_the_same_next_update(kind: str) -> None:
    spec = KINDS[kind][0]
    algo = build(kind, seed=0)
    for step in range(3):
        algo.update(update_input(algo, spec, step))
    state = algo.state()
    assert state.updates == 3
    # `restore` may keep what it is given: hand it copies, as the checkpoint does.
    copied = TrainingState(
        {k: v.clone() for k, v in state.tensors.items()}, copy.deepcopy(state.meta), state.updates
    )
    fresh = build(kind, seed=1)
    fresh.restore(copied)
    assert fresh.updates == 3
    rng = torch.get_rng_state()  # TD3's smoothing noise and SAC's samples draw from it: the same for both
    want = host_stats(algo.update(update_input(algo, spec, 9)))
    torch.set_rng_state(rng)
    assert host_stats(fresh.update(update_input(fresh, spec, 9))) == want
    want_arrays, got_arrays = algo.export(), fresh.export()
    assert want_arrays.keys() == got_arrays.keys()
    assert all(np.array_equal(want_arrays[k], got_arrays[k]) for k in want_arrays)


class Mean:
    """A toy algorithm: no online/target/optimizer attributes for the checkpoint to reach into."""

    models = 1

    def __init__(self) -> None:
        self.online = nn.Linear(1, 1, bias=False)
        self.updates = 0
        self.seen = 0

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.online.weight += batch.reward.mean()
        self.updates += 1
        self.seen += len(batch.reward)
        return {"loss": self.online.weight.detach().reshape(())}

    def priorities(self) -> None:
        return None

    def export(self) -> dict[str, np.ndarray]:
        return {"w": self.online.weight.detach().numpy().copy()}

    def state(self) -> TrainingState:
        return TrainingState({"w": self.online.weight.detach()}, {"seen": self.seen}, self.updates)

    def restore(self, state: TrainingState) -> None:
        with torch.no_grad():
            self.online.weight.copy_(state.tensors["w"])
        self.seen, self.updates = state.meta["seen"], state.updates

    def join_group(self) -> None:
        pass


def test_the_checkpoint_stores_whatever_state_an_algorithm_gives_and_hands_it_back() -> None:
    algo = Mean()
    algo.update(batch(DISCRETE, 0))
    algo.update(batch(DISCRETE, 1))
    snap = Capturer().capture(algo, {"epoch": 4}, {})
    assert snap.step == 2 and snap.meta["seen"] == 32
    fresh = Mean()
    counters = restore(fresh, Snapshot.from_bytes(snap.meta_bytes(), bytes(snap.flat.numpy())))
    assert counters == {"updates": 2, "epoch": 4}
    assert (fresh.updates, fresh.seen) == (2, 32)
    assert torch.equal(fresh.online.weight, algo.online.weight)


def test_algorithm_state_may_not_take_the_checkpoints_own_names() -> None:
    algo = Mean()
    algo.state = lambda: TrainingState({"rng.w": torch.zeros(1)}, {}, 0)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="rng"):
        Capturer().capture(algo, {}, {})
    algo.state = lambda: TrainingState({}, {"counters": 1}, 0)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="counters"):
        Capturer().capture(algo, {}, {})


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_background_capture_is_the_state_of_its_step_bit_for_bit_while_the_next_update_runs(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = KINDS[kind][0]
    algo = build(kind, seed=0)
    for step in range(2):
        algo.update(update_input(algo, spec, step))
    want = bytes(Capturer().capture(algo, {}, {}).flat.numpy())  # on this thread: the reference cut

    copy, before_step = checkpoint_state._copy, Capturer._before_step
    fence_entered = threading.Event()
    copy_saw_fence: list[bool] = []

    def held_copy(*args: Any) -> None:
        # The copy waits until the next update's optimizer step has reached the fence, so the
        # forward and backward run meanwhile; a step that did not wait would write first.
        copy_saw_fence.append(fence_entered.wait(timeout=10))
        copy(*args)

    def marked_before_step(self: Capturer, *args: Any) -> None:  # the optimizer step's pre-hook
        fence_entered.set()
        before_step(self, *args)

    monkeypatch.setattr(checkpoint_state, "_copy", held_copy)
    monkeypatch.setattr(Capturer, "_before_step", marked_before_step)
    cap = Capturer()
    snap = cap.capture(algo, {}, {}, background=True)
    assert not snap.copied.is_set()
    algo.update(update_input(algo, spec, 7))
    assert copy_saw_fence == [True] and snap.copied.is_set() and cap.fences == 1
    assert bytes(snap.flat.numpy()) == want
    # The update did change the state, so a step that did not wait would have been caught.
    assert bytes(Capturer().capture(algo, {}, {}).flat.numpy()) != want
