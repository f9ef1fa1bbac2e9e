"""learner/algorithms/td3.py: it learns, and its checkpoint continues bit for bit."""

from __future__ import annotations

import torch

from canopy.config import LearnerConfig
from canopy.learner.algorithms.dqn import Batch
from canopy.learner.algorithms.td3 import TD3
from canopy.learner.checkpoint.state import Capturer, restore


def bandit_batch(n: int = 128) -> Batch:
    """A one-step problem: reward -(a - 0.5)^2 in every state, episodes end at once."""
    obs = torch.randn(n, 3)
    action = torch.rand(n, 1) * 2 - 1
    reward = -((action.squeeze(1) - 0.5) ** 2)
    return Batch(obs, action, reward, torch.randn(n, 3), torch.zeros(n))


def test_the_actor_learns_the_best_action_of_a_continuous_bandit() -> None:
    torch.manual_seed(0)
    algo = TD3(3, 1, LearnerConfig(hidden=[32], lr=1e-2))
    for _ in range(800):
        algo.update(bandit_batch(64))
    with torch.no_grad():
        actions = algo.online["actor"](torch.randn(64, 3))
    assert abs(actions.mean().item() - 0.5) < 0.1
    assert algo.last_td_error is not None and algo.last_td_error.shape == (64,)


def test_the_actor_is_updated_only_every_policy_delay_critic_updates() -> None:
    torch.manual_seed(0)
    algo = TD3(3, 1, LearnerConfig(hidden=[8], policy_delay=3))
    before = [p.clone() for p in algo.online["actor"].parameters()]
    algo.update(bandit_batch())
    algo.update(bandit_batch())
    assert all(torch.equal(a, b) for a, b in zip(before, algo.online["actor"].parameters(), strict=True))
    algo.update(bandit_batch())
    assert not all(torch.equal(a, b) for a, b in zip(before, algo.online["actor"].parameters(), strict=True))


def test_a_restored_checkpoint_makes_the_same_next_update() -> None:
    cfg = LearnerConfig(hidden=[16])
    torch.manual_seed(0)
    algo = TD3(3, 1, cfg)
    for _ in range(5):
        algo.update(bandit_batch())
    snap = Capturer().capture(algo, {}, {})
    torch.manual_seed(1)
    batch = bandit_batch()
    expected = algo.update(batch)

    fresh = TD3(3, 1, cfg)
    restore(fresh, snap)  # also restores the torch RNG the smoothing noise draws from
    assert {k: v.item() for k, v in fresh.update(batch).items()} == {k: v.item() for k, v in expected.items()}
    for a, b in zip(algo.online.parameters(), fresh.online.parameters(), strict=True):
        assert torch.equal(a, b)
