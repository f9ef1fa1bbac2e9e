"""learner/algorithms/advantages.py: V-trace and GAE against direct loops over the papers' sums,
on random unrolls with episode ends inside them, truncated (padded) unrolls and off-policy ratios."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canopy.learner.algorithms.advantages import discounts_of, gae, vtrace

B, T, GAMMA = 6, 9, 0.97


def random_unrolls(seed: int) -> dict[str, np.ndarray]:
    """Rows of random length L in [1, T] (padding after), terminations inside them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    terminated = (rng.random((B, T)) < 0.25) * mask
    return {
        "mask": mask,
        "terminated": terminated,
        "rewards": rng.normal(size=(B, T)) * mask,
        "values": rng.normal(size=(B, T + 1)),
        "log_rhos": rng.normal(scale=0.7, size=(B, T)),
        "lengths": lengths,
    }


def vtrace_by_sums(u: dict[str, np.ndarray], rho_bar: float, c_bar: float) -> tuple[np.ndarray, np.ndarray]:
    """v_s = V(x_s) + sum_{t=s}^{L-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t, with
    delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)) and gamma_i = 0 after a termination;
    advantage_s = rho_s (r_s + gamma_s v_{s+1} - V(x_s)) with v_L = V(x_L)."""
    vs, adv = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        n, values = u["lengths"][b], u["values"][b]
        ratio = np.exp(u["log_rhos"][b])
        rho, c = np.minimum(rho_bar, ratio), np.minimum(c_bar, ratio)
        gammas = [GAMMA * (1 - u["terminated"][b, t]) for t in range(n)]
        delta = [rho[t] * (u["rewards"][b, t] + gammas[t] * values[t + 1] - values[t]) for t in range(n)]
        for s in range(n):
            total, weight = 0.0, 1.0
            for t in range(s, n):
                total += weight * delta[t]
                weight *= gammas[t] * c[t]
            vs[b, s] = values[s] + total
        for s in range(n):
            v_next = vs[b, s + 1] if s + 1 < n else values[n]
            adv[b, s] = rho[s] * (u["rewards"][b, s] + gammas[s] * v_next - values[s])
    return vs, adv


def gae_by_sums(u: dict[str, np.ndarray], lam: float) -> np.ndarray:
    """A_s = sum_{t=s}^{L-1} (prod_{i=s}^{t-1} gamma_i lambda) delta_t."""
    adv = np.zeros((B, T))
    for b in range(B):
        n, values = u["lengths"][b], u["values"][b]
        gammas = [GAMMA * (1 - u["terminated"][b, t]) for t in range(n)]
        delta = [u["rewards"][b, t] + gammas[t] * values[t + 1] - values[t] for t in range(n)]
        for s in range(n):
            weight = 1.0
            for t in range(s, n):
                adv[b, s] += weight * delta[t]
                weight *= gammas[t] * lam
    return adv


def tensors(u: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in u.items() if k != "lengths"}
    t["discounts"] = discounts_of(GAMMA, t["terminated"], t["mask"])
    return t


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("rho_bar", "c_bar"), [(1.0, 1.0), (2.0, 0.5), (float("inf"), float("inf"))])
def test_vtrace_matches_the_papers_sum(seed: int, rho_bar: float, c_bar: float) -> None:
    u = random_unrolls(seed)
    t = tensors(u)
    vs, adv = vtrace(t["log_rhos"], t["discounts"], t["rewards"], t["values"], t["mask"], rho_bar, c_bar)
    want_vs, want_adv = vtrace_by_sums(u, rho_bar, c_bar)
    mask = u["mask"].astype(bool)
    np.testing.assert_allclose(vs.numpy()[mask], want_vs[mask], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(adv.numpy(), want_adv, rtol=1e-10, atol=1e-10)  # 0 on padding


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_the_papers_sum(seed: int, lam: float) -> None:
    u = random_unrolls(seed)
    t = tensors(u)
    adv, returns = gae(t["discounts"], t["rewards"], t["values"], t["mask"], lam)
    np.testing.assert_allclose(adv.numpy(), gae_by_sums(u, lam), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(returns.numpy(), adv.numpy() + u["values"][:, :-1], rtol=1e-12)


def test_on_policy_vtrace_is_the_bootstrapped_return_gae_lambda_1_gives() -> None:
    u = random_unrolls(7)
    t = tensors(u)
    zero = torch.zeros_like(t["log_rhos"])
    vs, _ = vtrace(zero, t["discounts"], t["rewards"], t["values"], t["mask"], float("inf"), float("inf"))
    _, returns = gae(t["discounts"], t["rewards"], t["values"], t["mask"], 1.0)
    mask = u["mask"].astype(bool)
    np.testing.assert_allclose(vs.numpy()[mask], returns.numpy()[mask], rtol=1e-10, atol=1e-10)


def test_a_termination_stops_the_bootstrap_and_a_truncation_keeps_it() -> None:
    # One step each, reward 1, V(next) = 10: terminated -> target 1; truncated -> 1 + gamma * 10.
    values = torch.tensor([[0.0, 10.0], [0.0, 10.0]], dtype=torch.float64)
    rewards = torch.ones(2, 1, dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.float64)
    discounts = discounts_of(GAMMA, torch.tensor([[1.0], [0.0]], dtype=torch.float64), mask)
    vs, _ = vtrace(torch.zeros(2, 1, dtype=torch.float64), discounts, rewards, values, mask)
    assert vs[:, 0].tolist() == pytest.approx([1.0, 1.0 + GAMMA * 10.0])
