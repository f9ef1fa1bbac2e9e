"""learner/algorithms/sac.py: the squashed Gaussian's log-density, the entropy temperature,
the soft twin-critic target, and that it learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from canopy.config import LearnerConfig
from canopy.learner.algorithms.base import Batch
from canopy.learner.algorithms.sac import HALF_LOG_2PI, SAC, SquashedGaussianActor, squashed_log_prob
from canopy.learner.checkpoint.state import Capturer, restore


def fixed_actor(mean: float, log_std: float) -> SquashedGaussianActor:
    """A 1-d actor whose Gaussian is (mean, exp(log_std)) whatever the observation."""
    actor = SquashedGaussianActor(1, 1, [])
    with torch.no_grad():
        actor.layers[0].weight.zero_()
        actor.layers[0].bias.copy_(torch.tensor([mean, log_std]))
    return actor


def density(actions: torch.Tensor, mean: float, log_std: float) -> torch.Tensor:
    """exp(log pi(a)) of `squashed_log_prob` for 1-d actions in (-1, 1), in float64."""
    x = torch.atanh(actions.double())[:, None]
    eps = (x - mean) / math.exp(log_std)
    return squashed_log_prob(x, eps, torch.full_like(x, log_std)).exp()


@pytest.mark.parametrize(("mean", "log_std"), [(0.0, -0.5), (0.8, -1.0), (-0.5, 0.0), (1.5, -2.0)])
def test_the_squashed_density_integrates_to_one_over_the_action_interval(mean: float, log_std: float) -> None:
    a = torch.linspace(-1 + 1e-7, 1 - 1e-7, 400_001, dtype=torch.float64)
    mass = torch.trapezoid(density(a, mean, log_std), a).item()
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_samples_follow_the_density_and_carry_their_own_log_probability() -> None:
    torch.manual_seed(0)
    mean, log_std = 0.6, -0.3
    actor = fixed_actor(mean, log_std)
    n = 200_000
    with torch.no_grad():
        action, logp = actor.sample(torch.zeros(n, 1))
    assert action.shape == (n, 1) and logp.shape == (n,) and action.abs().max() <= 1
    # Mass per bin from the Gaussian's CDF at atanh of the edges (exact) against the histogram.
    edges = torch.linspace(-0.99, 0.99, 21, dtype=torch.float64)
    normal = torch.distributions.Normal(mean, math.exp(log_std))
    want = normal.cdf(torch.atanh(edges))[1:] - normal.cdf(torch.atanh(edges))[:-1]
    got = torch.histogram(action[:, 0].double(), edges).hist / n
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=5 * math.sqrt(0.25 / n))
    # Each sample's log-probability is the density at the sampled action.
    inside = action[:, 0].abs() < 0.999  # atanh stays accurate in float32 here
    want_logp = density(action[inside, 0], mean, log_std).log().float()
    np.testing.assert_allclose(logp[inside].numpy(), want_logp.numpy(), atol=2e-3)


def test_the_stable_tanh_correction_equals_the_naive_one_and_stays_finite_beyond() -> None:
    x = torch.linspace(-12, 12, 2401)[:, None]
    zero = torch.zeros_like(x)
    # With eps = 0 and log_std = 0, what is left beside -HALF_LOG_2PI is -log(1 - tanh(x)^2).
    correction = -(squashed_log_prob(x, zero, zero) + HALF_LOG_2PI)
    naive = torch.log(1 - torch.tanh(x.double()) ** 2)  # finite in float64 up to |x| ~ 18
    np.testing.assert_allclose(correction.numpy(), naive[:, 0].numpy(), atol=1e-4, rtol=1e-5)
    far = torch.tensor([[-40.0], [30.0]])
    assert torch.isinf(torch.log(1 - torch.tanh(far) ** 2)).all()  # float32's naive form fails
    stable = -(squashed_log_prob(far, torch.zeros_like(far), torch.zeros_like(far)) + HALF_LOG_2PI)
    # log(1 - tanh(x)^2) -> 2 (log 2 - |x|) for large |x|.
    np.testing.assert_allclose(stable.numpy(), 2 * (math.log(2) - far.abs()[:, 0].numpy()), rtol=1e-6)


def bandit_batch(n: int = 64) -> Batch:
    """A one-step problem in one constant state: reward -(a - 0.5)^2, episodes end at once."""
    action = torch.rand(n, 1) * 2 - 1
    reward = -((action.squeeze(1) - 0.5) ** 2)
    obs = torch.ones(n, 3)
    return Batch(obs, action, reward, obs.clone(), torch.zeros(n))


def with_log_std(algo: SAC, log_std: float) -> SAC:
    """The actor's log std set to `log_std` for every observation."""
    last = algo.online["actor"].layers[-1]
    with torch.no_grad():
        last.weight[1:].zero_()
        last.bias[1:] = log_std
    return algo


@pytest.mark.parametrize(("log_std", "alpha_rises"), [(0.0, False), (-4.5, True)])
def test_the_temperature_moves_the_entropy_toward_its_target(log_std: float, alpha_rises: bool) -> None:
    torch.manual_seed(0)
    algo = with_log_std(SAC(3, 1, LearnerConfig(hidden=[16])), log_std)
    assert algo.target_entropy == -1.0
    batch = bandit_batch()
    alpha = [algo.online["temperature"]().item()]
    for _ in range(5):
        stats = algo.update(batch)
        # std 1: entropy well above the target of -1; std e^-4.5: far below it.
        assert (stats["entropy"].item() < algo.target_entropy) == alpha_rises
        alpha.append(algo.online["temperature"]().item())
    steps = np.diff(alpha)
    assert (steps > 0).all() if alpha_rises else (steps < 0).all()


def constant_head(layers: torch.nn.ModuleList, value: float) -> None:
    """A Q-network that outputs `value` for every input."""
    with torch.no_grad():
        layers[-1].weight.zero_()
        layers[-1].bias.fill_(value)


@pytest.mark.parametrize(("q1", "q2"), [(5.0, -3.0), (-3.0, 5.0)])
def test_the_critic_target_takes_the_smaller_target_twin(q1: float, q2: float) -> None:
    torch.manual_seed(0)
    algo = SAC(3, 1, LearnerConfig(hidden=[8]))
    constant_head(algo.target.q1, q1)
    constant_head(algo.target.q2, q2)
    constant_head(algo.online["critic"].q1, 0.0)
    with torch.no_grad():
        algo.online["temperature"].log_alpha.fill_(-60.0)  # alpha ~ 1e-26: no entropy term
    obs, next_obs = torch.randn(8, 3), torch.randn(8, 3)
    batch = Batch(obs, torch.rand(8, 1), torch.randn(8), next_obs, torch.full((8,), 0.9))
    algo.update(batch)
    # |y - Q1(s, a)| with Q1 = 0 before the step: y = r + 0.9 * min(5, -3).
    np.testing.assert_allclose(algo.last_td_error.numpy(), (batch.reward - 2.7).abs().numpy(), rtol=1e-6)


def test_the_entropy_bonus_raises_the_critic_target() -> None:
    torch.manual_seed(0)
    algo = with_log_std(SAC(3, 1, LearnerConfig(hidden=[8])), -4.5)
    for layers in (algo.target.q1, algo.target.q2):
        constant_head(layers, 20.0)
    constant_head(algo.online["critic"].q1, 0.0)
    n = 4096
    batch = Batch(torch.randn(n, 3), torch.rand(n, 1), torch.zeros(n), torch.randn(n, 3), torch.ones(n))
    with torch.no_grad():
        algo.online["temperature"].log_alpha.fill_(math.log(2.0))
        _, logp = algo.online["actor"].sample(batch.next_obs)
    algo.update(batch)
    # y = 0 + 1 * (20 - 2 log pi(a'|s')): a narrow Gaussian's log pi is large and positive,
    # so y is near 13, not the 27 of a bonus with the wrong sign (nor the 20 of none).
    expected = (20.0 - 2.0 * logp).mean().item()
    assert algo.last_td_error.mean().item() == pytest.approx(expected, rel=0.05)


def test_sac_learns_the_best_action_of_a_continuous_bandit() -> None:
    torch.manual_seed(0)
    algo = SAC(3, 1, LearnerConfig(hidden=[32], lr=1e-2))
    # 500 updates: while the policy is still wide (alpha high), the best Gaussian puts tanh(mean)
    # above 0.5, since tanh squeezes the upper tail; it closes in as the temperature falls.
    for _ in range(500):
        stats = algo.update(bandit_batch())
    with torch.no_grad():
        greedy = algo.online["actor"].greedy(torch.ones(8, 3))
    assert abs(greedy.mean().item() - 0.5) < 0.1
    assert stats["alpha"].item() < 1.0  # the policy narrowed, so the temperature came down
    assert algo.last_td_error is not None and algo.last_td_error.shape == (64,)


def test_a_restored_checkpoint_makes_the_same_next_update() -> None:
    cfg = LearnerConfig(hidden=[16])
    torch.manual_seed(0)
    algo = SAC(3, 1, cfg)
    for _ in range(5):
        algo.update(bandit_batch())
    assert algo.online["temperature"]().item() != 1.0  # the temperature's Adam state is in play
    snap = Capturer().capture(algo, {}, {})
    batch = bandit_batch()
    rng = torch.get_rng_state()  # what the next update's policy samples draw from
    expected = algo.update(batch)

    fresh = SAC(3, 1, cfg)
    restore(fresh, snap)  # sets the torch RNG back to the capture's: hand it the update's
    torch.set_rng_state(rng)
    assert {k: v.item() for k, v in fresh.update(batch).items()} == {k: v.item() for k, v in expected.items()}
    for a, b in zip(algo.online.parameters(), fresh.online.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(algo.target.parameters(), fresh.target.parameters(), strict=True):
        assert torch.equal(a, b)
