"""learner/algorithms/dqn.py: double DQN updates on fixed batches with real torch."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from canopy.config import LearnerConfig
from canopy.learner.algorithms.dqn import DQN, Batch
from canopy.learner.network import QNetwork

OBS, ACTIONS = 4, 2


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """As the learner runs on CPU (learner.threads = 1): tiny nets gain nothing from more
    threads, and spinning OpenMP workers on a busy 2-core machine cost 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_batch(n: int = 64, discount: float = 0.9, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(n, OBS, generator=g),
        action=torch.randint(0, ACTIONS, (n,), generator=g),
        reward=torch.randn(n, generator=g),
        next_obs=torch.randn(n, OBS, generator=g),
        discount=torch.full((n,), discount),
    )


def make_dqn(**cfg: object) -> DQN:
    torch.manual_seed(0)
    return DQN(QNetwork(OBS, ACTIONS, [32, 32]), LearnerConfig(**cfg))


def td_loss(algo: DQN, batch: Batch) -> float:
    """The same Huber TD loss the update minimises, evaluated without changing anything."""
    with torch.no_grad():
        q = algo.online(batch.obs).gather(1, batch.action.unsqueeze(1)).squeeze(1)
        next_a = algo.online(batch.next_obs).argmax(dim=1, keepdim=True)
        target = batch.reward + batch.discount * algo.target(batch.next_obs).gather(1, next_a).squeeze(1)
        return torch.nn.functional.smooth_l1_loss(q, target).item()


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_update_reports_the_loss_before_it_and_reduces_td_loss_on_that_batch() -> None:
    algo = make_dqn(lr=1e-3, target_update_period=1000)
    batch = make_batch()
    before = td_loss(algo, batch)

    stats = algo.update(batch)

    assert stats["loss"].item() == pytest.approx(before, rel=1e-5)
    assert td_loss(algo, batch) < before
    assert algo.updates == 1


def test_repeated_updates_on_a_fixed_batch_drive_the_td_loss_down() -> None:
    algo = make_dqn(lr=3e-3, target_update_period=1000)
    batch = make_batch()
    before = td_loss(algo, batch)
    for _ in range(200):
        algo.update(batch)
    assert td_loss(algo, batch) < 0.5 * before


def test_polyak_target_moves_tau_of_the_way_toward_the_online_net_each_period() -> None:
    algo = make_dqn(lr=1e-2, target_update_period=1, tau=0.25)
    batch = make_batch()
    for _ in range(3):
        before = params(algo.target)
        algo.update(batch)
        expected = [t + 0.25 * (o - t) for t, o in zip(before, params(algo.online), strict=True)]
        for got, want in zip(params(algo.target), expected, strict=True):
            torch.testing.assert_close(got, want)


def test_learning_rate_anneals_linearly_to_lr_final_then_stays() -> None:
    algo = make_dqn(lr=1e-3, lr_anneal_updates=4, lr_final=2e-4)
    batch = make_batch()
    seen = []
    for _ in range(6):
        seen.append(algo.optimizer.param_groups[0]["lr"])
        algo.update(batch)
    assert seen == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4, 2e-4])


@pytest.mark.parametrize("period", [pytest.param(1, id="every-update"), pytest.param(3, id="every-third")])
def test_target_network_is_a_hard_copy_every_target_update_period_updates(period: int) -> None:
    algo = make_dqn(lr=1e-2, target_update_period=period, tau=1.0)
    batch = make_batch()
    initial = params(algo.target)
    assert same(initial, params(algo.online))

    for i in range(1, 2 * period + 1):
        algo.update(batch)
        if i % period == 0:
            assert same(params(algo.target), params(algo.online)), f"not copied after update {i}"
            initial = params(algo.target)
        else:
            assert same(params(algo.target), initial), f"target moved between copies (update {i})"
            assert not same(params(algo.target), params(algo.online))


def test_target_network_gets_no_gradients() -> None:
    algo = make_dqn()
    algo.update(make_batch())
    assert all(not p.requires_grad and p.grad is None for p in algo.target.parameters())


def test_terminal_transitions_ignore_next_obs_entirely() -> None:
    batch = make_batch(discount=0.0)
    wild = copy.copy(batch)
    wild.next_obs = batch.next_obs * 1000 + 50

    a, b = make_dqn(), make_dqn()
    stats_a, stats_b = a.update(batch), b.update(wild)

    assert stats_a["loss"].item() == stats_b["loss"].item()
    assert same(params(a.online), params(b.online))


def test_terminal_transitions_regress_q_of_the_taken_action_to_the_reward() -> None:
    batch = make_batch(n=16, discount=0.0)
    algo = make_dqn(lr=3e-3, target_update_period=10)
    for _ in range(500):
        algo.update(batch)
    with torch.no_grad():
        q = algo.online(batch.obs).gather(1, batch.action.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(q, batch.reward, atol=0.05, rtol=0)


def test_bootstrapped_target_uses_the_online_argmax_valued_by_the_target_net() -> None:
    algo = make_dqn(lr=0.0, target_update_period=1000)  # lr 0: the update changes no weight
    with torch.no_grad():
        for p in algo.target.parameters():
            p.mul_(-1.0)  # target net now disagrees with online about the best action
    batch = make_batch(discount=0.5)
    with torch.no_grad():
        q = algo.online(batch.obs).gather(1, batch.action.unsqueeze(1)).squeeze(1)
        online_next = algo.online(batch.next_obs)
        double_q = algo.target(batch.next_obs).gather(1, online_next.argmax(1, keepdim=True)).squeeze(1)
        expected = torch.nn.functional.smooth_l1_loss(q, batch.reward + 0.5 * double_q).item()
        plain_max = algo.target(batch.next_obs).max(1).values
        plain = torch.nn.functional.smooth_l1_loss(q, batch.reward + 0.5 * plain_max).item()
    assert expected != pytest.approx(plain)  # the case really tells double-Q from max-Q
    assert algo.update(batch)["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_items_with_importance_weight_zero_do_not_move_the_network() -> None:
    algo = make_dqn()
    batch = make_batch()
    batch.weight = torch.zeros(len(batch.reward))
    before = params(algo.online)
    algo.update(batch)
    assert same(before, params(algo.online))


def test_an_update_leaves_one_absolute_td_error_per_item_for_new_priorities() -> None:
    algo = make_dqn()
    batch = make_batch(n=16)
    algo.update(batch)
    assert algo.last_td_error is not None
    assert algo.last_td_error.shape == (16,)
    assert bool((algo.last_td_error >= 0).all())


def test_bf16_autocast_is_for_cuda_only_and_leaves_cpu_updates_exact() -> None:
    batch = make_batch()
    plain, flagged = make_dqn(), make_dqn(bf16=True)
    assert plain.update(batch)["loss"].item() == flagged.update(batch)["loss"].item()
    assert same(params(plain.online), params(flagged.online))


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_trains_in_reduced_precision() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batch = make_batch()
    algo = make_dqn(bf16=True)
    algo.online.cuda()
    algo.target.cuda()
    cuda = type(batch)(*(t.cuda() if t is not None else None for t in vars(batch).values()))
    stats = algo.update(cuda)
    assert torch.isfinite(stats["loss"]).item()
