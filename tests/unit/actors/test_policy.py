"""actors/policy.py: the numpy forward pass must equal the learner's torch QNetwork, and the
stochastic policies must sample and score actions as torch.distributions does."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch

from canopy.actors.explore import Explorer
from canopy.actors.policy import (
    CategoricalPolicy,
    GaussianPolicy,
    MLPPolicy,
    SquashedGaussianPolicy,
    env_action,
    epsilon_ladder,
    policy_from_arrays,
)
from canopy.arch import CATEGORICAL_MLP, GAUSSIAN_MLP, LOG_STD_MAX, LOG_STD_MIN, SQUASHED_GAUSSIAN_MLP
from canopy.errors import ProtocolError
from canopy.learner.algorithms.sac import SquashedGaussianActor, squashed_log_prob
from canopy.learner.network import ARCH, QNetwork

ARCHITECTURES = [
    pytest.param(4, 2, [128, 128], id="cartpole-default"),
    pytest.param(6, 3, [64], id="one-hidden"),
    pytest.param(8, 4, [32, 16, 8], id="three-hidden"),
    pytest.param(3, 5, [], id="linear"),
]


@pytest.mark.parametrize(("obs_size", "n_actions", "hidden"), ARCHITECTURES)
def test_numpy_policy_equals_the_torch_qnetwork_for_the_same_weights(
    obs_size: int, n_actions: int, hidden: list[int]
) -> None:
    torch.manual_seed(0)
    net = QNetwork(obs_size, n_actions, hidden)
    policy = MLPPolicy.from_arrays(ARCH, net.export())
    obs = np.random.default_rng(0).normal(scale=2.0, size=(33, obs_size)).astype(np.float32)

    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    got = policy.q_values(obs)

    assert got.shape == (33, n_actions)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert policy.in_features == obs_size


def test_numpy_policy_accepts_float64_observations_like_cartpole_may_give() -> None:
    torch.manual_seed(1)
    net = QNetwork(4, 2, [16])
    obs = np.random.default_rng(1).normal(size=(5, 4))
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(MLPPolicy.from_arrays(ARCH, net.export()).q_values(obs), expected, atol=1e-5)


def test_the_numpy_mlp_with_layer_norm_matches_the_learners_q_network() -> None:
    torch.manual_seed(0)
    net = QNetwork(4, 3, [16, 8], layer_norm=True)
    with torch.no_grad():  # away from LayerNorm's initial scale 1, shift 0
        for norm in net.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    obs = np.random.default_rng(2).normal(size=(7, 4)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    arrays = net.export()
    assert "layers.1.norm_bias" in arrays and "layers.2.norm_weight" not in arrays
    np.testing.assert_allclose(MLPPolicy.from_arrays(ARCH, arrays).q_values(obs), expected, atol=1e-5)


def weights(*shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    names = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    return {n: np.zeros(s, np.float32) for n, s in zip(names, shapes, strict=False)}


BAD_WEIGHTS = [
    pytest.param("cnn", weights((4, 3), (4,)), id="unknown-arch"),
    pytest.param("mlp", {}, id="no-arrays"),
    pytest.param("mlp", weights((4, 3), (4,), (2, 4)), id="odd-count"),
    pytest.param("mlp", weights((4, 3), (5,)), id="bias-size"),
    pytest.param("mlp", weights((4,), (4,)), id="weight-not-2d"),
    pytest.param("mlp", weights((4, 3), (4,), (2, 5), (2,)), id="layers-do-not-chain"),
    pytest.param(
        "mlp",
        {"layers.0.weight": np.zeros((4, 3), np.float32), "layer.0.bias": np.zeros(4, np.float32)},
        id="bad-name",
    ),
    pytest.param(
        "mlp", weights((4, 3), (4,), (2, 4), (2,)) | {"layers.1.norm_weight": np.ones(2)}, id="norm-on-output"
    ),
    pytest.param(
        "mlp", weights((4, 3), (4,), (2, 4), (2,)) | {"layers.0.norm_weight": np.ones(4)}, id="half-a-norm"
    ),
    pytest.param(
        "mlp", weights((4, 3), (4,), (2, 4), (2,)) | {"layers.2.bias": np.ones(2)}, id="bias-only-layer"
    ),
]


@pytest.mark.parametrize(("arch", "arrays"), BAD_WEIGHTS)
def test_weights_that_do_not_form_an_mlp_are_a_protocol_error(arch: str, arrays: dict) -> None:
    with pytest.raises(ProtocolError):
        MLPPolicy.from_arrays(arch, arrays)


def test_epsilon_ladder_runs_from_base_to_base_to_the_one_plus_alpha() -> None:
    base, alpha, slots = 0.4, 7.0, 16
    eps = [epsilon_ladder(i, slots, base, alpha) for i in range(slots)]
    assert eps[0] == pytest.approx(base)
    assert eps[-1] == pytest.approx(base ** (1 + alpha))
    assert all(a > b for a, b in itertools.pairwise(eps))
    assert epsilon_ladder(0, 1, base, alpha) == base


def torch_mlp(obs_size: int, outputs: int, hidden: list[int], seed: int = 0) -> QNetwork:
    """A learner-side MLP (the same `layers.<i>` names and ReLUs) with fixed weights."""
    torch.manual_seed(seed)
    return QNetwork(obs_size, outputs, hidden)


def forward(net: QNetwork, obs: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.from_numpy(obs))


OBS = np.random.default_rng(3).normal(scale=2.0, size=(64, 6)).astype(np.float32)


def test_the_architecture_names_build_the_stochastic_policies() -> None:
    arrays = torch_mlp(6, 3, [16]).export()
    assert type(policy_from_arrays(CATEGORICAL_MLP, arrays)) is CategoricalPolicy
    gaussian = policy_from_arrays(GAUSSIAN_MLP, arrays | {"log_std": np.zeros(3, np.float32)})
    assert type(gaussian) is GaussianPolicy
    with pytest.raises(ProtocolError):  # a log_std belongs to gaussian_mlp only
        policy_from_arrays(CATEGORICAL_MLP, arrays | {"log_std": np.zeros(3, np.float32)})


def test_categorical_log_probs_equal_torch_categorical_on_the_same_weights() -> None:
    net = torch_mlp(6, 5, [32, 16])
    policy = policy_from_arrays(CATEGORICAL_MLP, net.export())
    actions, logp = policy.sample(OBS, np.random.default_rng(0))
    assert actions.dtype == np.int64 and actions.shape == (64,)
    assert logp.dtype == np.float32 and logp.shape == (64,)
    want = torch.distributions.Categorical(logits=forward(net, OBS)).log_prob(torch.from_numpy(actions))
    np.testing.assert_allclose(logp, want.numpy(), atol=1e-5, rtol=1e-5)
    assert len(set(actions.tolist())) > 1  # drawn, not the argmax of every row


def fixed_logits(logits: list[float], obs_size: int = 2) -> dict[str, np.ndarray]:
    """A linear `layers.0` whose outputs are `logits` whatever the observation."""
    return {
        "layers.0.weight": np.zeros((len(logits), obs_size), np.float32),
        "layers.0.bias": np.array(logits, np.float32),
    }


def test_categorical_actions_are_drawn_with_softmax_frequencies() -> None:
    # Shifted by 1000: a softmax that did not subtract the max would overflow to nan.
    logits = [1000 + np.log(p) for p in (0.6, 0.25, 0.1, 0.05)]
    policy = policy_from_arrays(CATEGORICAL_MLP, fixed_logits(logits))
    n = 20_000
    actions, logp = policy.sample(np.zeros((n, 2), np.float32), np.random.default_rng(7))
    freq = np.bincount(actions, minlength=4) / n
    # 4.5 standard errors of the largest (p = 0.6, n = 20000: 0.0035) for a seeded rng.
    np.testing.assert_allclose(freq, [0.6, 0.25, 0.1, 0.05], atol=0.016)
    np.testing.assert_allclose(logp, np.log([0.6, 0.25, 0.1, 0.05])[actions], atol=1e-4)


def test_the_greedy_discrete_action_is_the_argmax_of_the_logits() -> None:
    net = torch_mlp(6, 4, [16])
    policy = policy_from_arrays(CATEGORICAL_MLP, net.export())
    logits = forward(net, OBS).numpy()
    np.testing.assert_allclose(policy.q_values(OBS), logits, atol=1e-5)
    explorer = Explorer(gym.spaces.Discrete(4), len(OBS), np.random.default_rng(0))
    np.testing.assert_array_equal(explorer.greedy(policy, OBS), logits.argmax(axis=1))


def gaussian(
    obs_size: int, d: int, hidden: list[int], log_std: np.ndarray, scale: float = 1.0
) -> tuple[QNetwork, GaussianPolicy]:
    """A torch mean network and the numpy policy of its arrays plus `log_std`; the last
    layer's weights times `scale`."""
    net = torch_mlp(obs_size, d, hidden)
    with torch.no_grad():
        net.layers[-1].weight.mul_(scale)
    return net, policy_from_arrays(GAUSSIAN_MLP, net.export() | {"log_std": log_std.astype(np.float32)})


def test_gaussian_log_densities_equal_torch_normal_of_the_raw_sample() -> None:
    log_std = np.array([-1.0, 0.0, 0.7])
    net, policy = gaussian(6, 3, [32], log_std)
    raw, logp = policy.sample(OBS, np.random.default_rng(1))
    assert raw.dtype == np.float32 and raw.shape == (64, 3)
    assert logp.dtype == np.float32 and logp.shape == (64,)
    assert (np.abs(raw) > 1).any()  # the learner gets the raw sample, unclipped
    normal = torch.distributions.Normal(forward(net, OBS), torch.tensor(np.exp(log_std), dtype=torch.float32))
    want = normal.log_prob(torch.from_numpy(raw)).sum(-1)
    np.testing.assert_allclose(logp, want.numpy(), atol=1e-4, rtol=1e-5)


def test_gaussian_samples_have_the_policys_mean_and_standard_deviation() -> None:
    log_std = np.array([-2.0, -0.5, 0.5])
    net, policy = gaussian(6, 3, [16], log_std)
    n = 20_000
    obs = np.repeat(OBS[:1], n, axis=0)
    raw, _ = policy.sample(obs, np.random.default_rng(2))
    mean = forward(net, OBS[:1]).numpy()[0]
    std = np.exp(log_std)
    # 5 standard errors of the sample mean (std / sqrt(n)) and standard deviation (~std / sqrt(2n)).
    np.testing.assert_allclose(raw.mean(axis=0), mean, atol=5 * std.max() / np.sqrt(n))
    np.testing.assert_allclose(raw.std(axis=0), std, rtol=5 / np.sqrt(2 * n))


def test_the_greedy_box_action_is_the_clipped_mean() -> None:
    net, policy = gaussian(6, 3, [16], np.zeros(3), scale=8.0)  # means beyond [-1, 1] for some rows
    mean = forward(net, OBS).numpy()
    assert (np.abs(mean) > 1).any() and (np.abs(mean) < 1).any()
    np.testing.assert_allclose(policy.q_values(OBS), mean, atol=1e-5)
    np.testing.assert_allclose(policy.actions(OBS), np.clip(mean, -1, 1), atol=1e-5)
    np.testing.assert_array_equal(env_action(mean), np.clip(mean, -1, 1))
    box = gym.spaces.Box(
        low=np.array([0.0, -2.0, 10.0], np.float32), high=np.array([1.0, 2.0, 20.0], np.float32)
    )
    explorer = Explorer(box, len(OBS), np.random.default_rng(0))
    want = box.low + (np.clip(mean, -1, 1) + 1) / 2 * (box.high - box.low)
    np.testing.assert_allclose(explorer.greedy(policy, OBS), want, atol=1e-4)


BAD_LOG_STD = [
    pytest.param(None, "needs a log_std", id="missing"),
    pytest.param(np.zeros(4), r"shape \(3,\)", id="too-long"),
    pytest.param(np.zeros(2), r"shape \(3,\)", id="too-short"),
    pytest.param(np.zeros((1, 3)), r"shape \(3,\)", id="batched"),
    pytest.param(np.float32(0.0), r"shape \(3,\)", id="scalar"),
    pytest.param(np.array([0.0, np.nan, 0.0]), "not finite", id="nan"),
    pytest.param(np.array([0.0, -np.inf, 0.0]), "not finite", id="minus-inf"),
]


@pytest.mark.parametrize(("log_std", "match"), BAD_LOG_STD)
def test_a_log_std_that_does_not_fit_the_mean_is_a_protocol_error(log_std: object, match: str) -> None:
    arrays = torch_mlp(6, 3, [8]).export()
    if log_std is not None:
        arrays["log_std"] = log_std
    with pytest.raises(ProtocolError, match=match):
        policy_from_arrays(GAUSSIAN_MLP, arrays)


def squashed(d: int, hidden: list[int], scale: float) -> tuple[SquashedGaussianActor, SquashedGaussianPolicy]:
    """sac's torch actor and the numpy policy of its exported arrays; the last layer's
    weights times `scale` (log stds beyond the clamp on both sides, means where tanh saturates)."""
    torch.manual_seed(5)
    actor = SquashedGaussianActor(6, d, hidden)
    with torch.no_grad():
        actor.layers[-1].weight.mul_(scale)
    policy = policy_from_arrays(SQUASHED_GAUSSIAN_MLP, actor.export())
    assert type(policy) is SquashedGaussianPolicy
    return actor, policy


def test_the_squashed_gaussian_policy_acts_and_scores_as_the_torch_actor_does() -> None:
    d = 3
    actor, policy = squashed(d, [32], scale=6.0)
    raw_log_std = policy.q_values(OBS)[:, d:]
    assert (raw_log_std > LOG_STD_MAX).any() and (raw_log_std < LOG_STD_MIN).any()  # both clamps act
    obs = torch.from_numpy(OBS)
    with torch.no_grad():
        mean, log_std = actor(obs)
        np.testing.assert_allclose(policy.actions(OBS), actor.greedy(obs).numpy(), atol=1e-5)
        actions, logp = policy.sample(OBS, np.random.default_rng(0))
        # The same eps the policy drew (one standard_normal call on a fresh generator).
        eps = torch.from_numpy(np.random.default_rng(0).standard_normal((len(OBS), d), dtype=np.float32))
        pre_tanh = mean + log_std.exp() * eps
        want_logp = squashed_log_prob(pre_tanh, eps, log_std)
    assert actions.dtype == np.float32 and actions.shape == (64, d) and np.abs(actions).max() <= 1
    assert logp.dtype == np.float32 and logp.shape == (64,)
    np.testing.assert_allclose(actions, torch.tanh(pre_tanh).numpy(), atol=1e-5)
    np.testing.assert_allclose(logp, want_logp.numpy(), atol=1e-3, rtol=1e-5)
    assert np.isfinite(logp).all()


def test_a_box_actor_with_a_squashed_gaussian_stores_the_policys_own_sample() -> None:
    _, policy = squashed(2, [16], scale=1.0)
    obs = OBS[:8]
    space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 10.0], np.float32))
    explorer = Explorer(space, len(obs), np.random.default_rng(1), noise=0.5)
    stored, env_actions = explorer.act(policy, obs)
    # No Gaussian noise on top (noise=0.5 would have moved them): exactly the policy's draw.
    np.testing.assert_array_equal(stored, policy.sample(obs, np.random.default_rng(1))[0])
    assert stored.dtype == np.float32 and np.abs(stored).max() <= 1
    span = space.high - space.low
    np.testing.assert_allclose(env_actions, space.low + (stored + 1) / 2 * span, rtol=1e-6)
    greedy = space.low + (policy.actions(obs) + 1) / 2 * span
    np.testing.assert_allclose(explorer.greedy(policy, obs), greedy, rtol=1e-6)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        pytest.param(weights((4, 6), (4,), (3, 4), (3,)), "2 x d outputs", id="odd-outputs"),
        pytest.param(
            weights((4, 6), (4,), (2, 4), (2,)) | {"log_std": np.zeros(1, np.float32)},
            "bad mlp array name",
            id="log-std-array",
        ),
        pytest.param(weights((4, 6), (4,), (2, 5), (2,)), "do not chain", id="layers-do-not-chain"),
    ],
)
def test_arrays_that_are_no_squashed_gaussian_are_a_protocol_error(arrays: dict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        policy_from_arrays(SQUASHED_GAUSSIAN_MLP, arrays)
    with pytest.raises(ProtocolError, match="cannot run architecture 'mlp'"):
        SquashedGaussianPolicy.from_arrays("mlp", weights((4, 6), (4,), (2, 4), (2,)))
