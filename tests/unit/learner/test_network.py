"""learner/network.py: the Q-networks and what actors receive from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canopy.actors.policy import MLPPolicy
from canopy.learner.network import QNetwork


@pytest.mark.parametrize("dueling", [False, True])
def test_actors_compute_the_learners_q_values_from_the_exported_arrays(dueling: bool) -> None:
    torch.manual_seed(0)
    net = QNetwork(6, 4, [32, 16], dueling=dueling)
    obs = np.random.default_rng(1).normal(size=(64, 6)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    policy = MLPPolicy.from_arrays("mlp", net.export())
    np.testing.assert_allclose(policy.q_values(obs), expected, rtol=1e-5, atol=1e-6)


def test_a_dueling_networks_advantages_have_zero_mean_so_v_is_the_mean_q() -> None:
    torch.manual_seed(0)
    net = QNetwork(3, 5, [8], dueling=True)
    x = torch.randn(10, 3)
    with torch.no_grad():
        h = torch.relu(net.layers[0](x))
        np.testing.assert_allclose(net(x).mean(dim=1).numpy(), net.value(h).squeeze(1).numpy(), rtol=1e-5)


def test_the_plain_network_exports_its_state_dict_names_in_layer_order() -> None:
    net = QNetwork(4, 2, [8, 8])
    assert list(net.export()) == list(net.state_dict())


def test_actors_run_the_nature_cnn_with_the_learners_q_values() -> None:
    from canopy.actors.policy import policy_from_arrays
    from canopy.learner.network import CNN_ARCH, NatureCNN

    torch.manual_seed(0)
    net = NatureCNN(4, 6)
    obs = np.random.default_rng(2).integers(0, 256, size=(3, 4, 84, 84), dtype=np.uint8)
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    got = policy_from_arrays(CNN_ARCH, net.export()).q_values(obs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_network_is_chosen_from_the_observation_space() -> None:
    from canopy.learner.network import ARCH, CNN_ARCH, NatureCNN, build

    net, arch = build((4, 84, 84), "uint8", 6, [64], dueling=False)
    assert isinstance(net, NatureCNN) and arch == CNN_ARCH
    net, arch = build((4,), "float32", 2, [64], dueling=True)
    assert isinstance(net, QNetwork) and net.dueling and arch == ARCH
