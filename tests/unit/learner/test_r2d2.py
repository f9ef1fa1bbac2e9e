"""learner/algorithms/r2d2.py with real torch: value rescaling, the priority mix, burn-in,
n-step double-Q targets inside sequences (against the actors' numpy twin), and the numpy
LSTM of actors/policy.py against torch's on the same weights."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from canopy.actors import explore
from canopy.actors.policy import LSTMQPolicy, RecurrentState, policy_from_arrays
from canopy.arch import LSTM_Q
from canopy.config import LearnerConfig
from canopy.learner.algorithms import r2d2
from canopy.learner.algorithms.base import Sequences
from canopy.learner.network import LSTMQNetwork

OBS, ACTIONS, T = 3, 2, 8


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_batch(b: int = 4, fresh: float = 0.0, seed: int = 0, lengths: list[int] | None = None) -> Sequences:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [T] * b
    mask = torch.stack([(torch.arange(T) < n).float() for n in lengths])
    terminated = torch.stack([((torch.arange(T) == n - 1) & (n < T)).float() for n in lengths])
    return Sequences(
        obs=torch.randn(b, T + 1, OBS, generator=g),
        action=torch.randint(0, ACTIONS, (b, T), generator=g),
        reward=torch.randn(b, T, generator=g) * mask,
        terminated=terminated,
        mask=mask,
        fresh=torch.full((b,), fresh),
        h0=torch.randn(b, 16, generator=g) * 0.5,
        c0=torch.randn(b, 16, generator=g) * 0.5,
    )


def make_algo(burn_in: int = 3, n_step: int = 3) -> r2d2.R2D2:
    torch.manual_seed(0)
    cfg = LearnerConfig(burn_in=burn_in, n_step=n_step, gamma=0.9, target_update_period=1, tau=1.0)
    return r2d2.R2D2(LSTMQNetwork(OBS, ACTIONS, [32, 16]), cfg)


def test_rescaling_h_has_the_papers_values_and_its_inverse_undoes_it() -> None:
    x = torch.tensor([-1000.0, -8.0, -0.5, 0.0, 0.5, 3.0, 8.0, 1000.0], dtype=torch.float64)
    h = r2d2.rescale(x)
    expected = torch.sign(x) * (torch.sqrt(x.abs() + 1) - 1) + 1e-3 * x
    torch.testing.assert_close(h, expected)
    assert h[5].item() == pytest.approx(1.0 + 3e-3)  # sqrt(4) - 1 + eps * 3
    assert h[1].item() == pytest.approx(-2.008)
    torch.testing.assert_close(r2d2.unrescale(h), x)
    torch.testing.assert_close(r2d2.rescale(r2d2.unrescale(x)), x)
    # the actors' numpy twins agree
    np.testing.assert_allclose(explore.rescale(x.numpy()), h.numpy())
    np.testing.assert_allclose(explore.unrescale(h.numpy()), x.numpy(), rtol=1e-9, atol=1e-9)


def test_priority_is_eta_max_plus_one_minus_eta_mean_over_the_learned_steps_only() -> None:
    td = torch.tensor([[1.0, -3.0, 100.0, 2.0], [0.5, 0.5, 0.5, -50.0]])
    learned = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    p = r2d2.priority_mix(td, learned)
    torch.testing.assert_close(p, torch.tensor([0.9 * 3 + 0.1 * 2, 0.9 * 0.5 + 0.1 * 0.5]))
    np.testing.assert_allclose(explore.priority_mix(td.numpy(), learned.numpy()), p.numpy(), rtol=1e-6)


def test_burn_in_steps_pass_no_gradient_and_have_no_loss() -> None:
    algo, burn = make_algo(burn_in=3), 3
    batch = make_batch(fresh=0.0, lengths=[T, T, 6, 2])
    batch.obs.requires_grad_(True)
    loss, _, _, learned = algo.loss(batch)
    loss.backward()
    assert (learned[:, :burn] == 0).all() and (learned[0, burn:] == 1).all()
    assert (learned[3] == 0).all()  # ended inside its burn-in: nothing to learn from
    grad = batch.obs.grad
    assert grad[:, :burn].abs().max() == 0  # the stored state's warm-up is not trained
    assert grad[:2, burn:T].abs().sum(dim=-1).min() > 0  # the learned steps are
    assert grad[2, burn:6].abs().sum(dim=-1).min() > 0 and grad[2, 6:].abs().max() == 0  # padding is not
    # burn-in rewards and actions change nothing
    changed = make_batch(fresh=0.0, lengths=[T, T, 6, 2])
    changed.reward[:, :burn] += 5.0
    changed.action[:, :burn] = 1 - changed.action[:, :burn]
    torch.testing.assert_close(algo.loss(changed)[0], loss.detach())


def test_a_sequence_that_starts_an_episode_is_learned_from_its_first_step() -> None:
    algo = make_algo(burn_in=3)
    batch = make_batch(fresh=1.0, lengths=[T, 2, T, T])
    batch.obs.requires_grad_(True)
    loss, _, _, learned = algo.loss(batch)
    loss.backward()
    np.testing.assert_array_equal(learned.numpy(), batch.mask.numpy())
    assert batch.obs.grad[:, 0].abs().sum(dim=-1).min() > 0


@pytest.mark.parametrize("n_step", [1, 3])
def test_the_torch_targets_and_the_actors_numpy_td_errors_agree(n_step: int) -> None:
    batch = make_batch(b=5, lengths=[T, 5, 1, 3, T], seed=3)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, T + 1, ACTIONS, generator=g, dtype=torch.float64)
    y = r2d2.targets(q, q, batch, n_step, 0.9)
    td = y - q[:, :-1].gather(2, batch.action.unsqueeze(2)).squeeze(2)
    chunk = {k: getattr(batch, k).numpy() for k in ("action", "reward", "terminated", "mask")}
    got = explore.sequence_td(q.numpy(), q.numpy(), chunk, n_step, 0.9)
    np.testing.assert_allclose(got, td.numpy(), rtol=1e-5, atol=1e-6)
    if n_step == 3:
        # by hand: row 1 terminated after 5 steps; its step 3 sums r3 + g r4, no bootstrap
        r = batch.reward[1].double()
        assert y[1, 3].item() == pytest.approx(r2d2.rescale(r[3] + 0.9 * r[4]).item())
        # row 0 (no end): step 2 bootstraps from step 5 with g^3, the online argmax valued
        r0 = batch.reward[0].double()
        boot = q[0, 5, q[0, 5].argmax()]
        want = r0[2] + 0.9 * r0[3] + 0.81 * r0[4] + 0.729 * r2d2.unrescale(boot)
        assert y[0, 2].item() == pytest.approx(r2d2.rescale(want).item())


def test_updates_lower_the_loss_and_send_one_priority_per_sequence() -> None:
    algo = make_algo()
    batch = make_batch(b=8, fresh=0.0, lengths=[T] * 6 + [5, 7])
    first = algo.loss(batch)[0].item()
    for _ in range(60):
        stats = algo.update(batch)
    assert stats["loss"].item() < first
    (p,) = algo.priorities()
    assert p.shape == (8,) and (p >= 0).all()
    assert algo.updates == 60


def test_the_numpy_lstm_matches_torch_over_a_sequence_with_a_reset_in_the_middle() -> None:
    torch.manual_seed(2)
    net = LSTMQNetwork(OBS, ACTIONS, [32, 16])
    policy = policy_from_arrays(LSTM_Q, net.export())
    assert isinstance(policy, LSTMQPolicy) and policy.state_size == 16
    n, steps, reset_at = 3, 10, 4
    obs = np.random.default_rng(0).normal(size=(n, steps, OBS)).astype(np.float32)
    # torch: the first episode from the zero state, the second again from zero
    with torch.no_grad():
        q1, _ = net(torch.from_numpy(obs[:, :reset_at]), net.zero_state(n))
        q2, (h, c) = net(torch.from_numpy(obs[:, reset_at:]), net.zero_state(n))
    want = torch.cat([q1, q2], dim=1).numpy()
    # numpy, as an acting loop carries it: the episode ends at step reset_at - 1; with
    # NEXT_STEP autoreset the step after is the reset step (its observation is dropped here
    # by feeding the next episode's first one twice: the state restarts after that step)
    carry = RecurrentState(n, policy.state_size)
    got = []
    for t in range(steps):
        got.append(carry.q_values(policy, obs[:, t]))
        ended = np.full(n, t == reset_at - 1)
        carry.stepped(ended, np.zeros(n, bool))
        if t == reset_at - 1:  # the reset step: its action is ignored, then the state is zeroed
            carry.q_values(policy, obs[:, t + 1])
            carry.stepped(np.zeros(n, bool), np.zeros(n, bool))
    np.testing.assert_allclose(np.stack(got, axis=1), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carry.h, h.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(carry.c, c.numpy(), rtol=1e-5, atol=1e-5)
    # and `unroll` from a stored state is torch's forward from it
    h0 = np.random.default_rng(1).normal(size=(n, 16)).astype(np.float32)
    with torch.no_grad():
        q, _ = net(torch.from_numpy(obs), (torch.from_numpy(h0), torch.from_numpy(-h0)))
    np.testing.assert_allclose(policy.unroll(obs, h0, -h0), q.numpy(), rtol=1e-5, atol=1e-5)
