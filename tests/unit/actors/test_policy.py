"""actors/policy.py: the numpy forward pass must equal the learner's torch QNetwork."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from canopy.actors.policy import MLPPolicy, epsilon_ladder
from canopy.errors import ProtocolError
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
