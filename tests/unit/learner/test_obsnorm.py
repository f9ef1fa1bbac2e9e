"""learner/obsnorm.py: running observation statistics, their fold into the published MLP,
and their trip through the learner's checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from canopy.actors.policy import policy_from_arrays, population_arrays
from canopy.arch import CATEGORICAL_MLP, GAUSSIAN_MLP, SQUASHED_GAUSSIAN_MLP
from canopy.cluster.export import layer_sizes
from canopy.config import EnvConfig, LearnerConfig
from canopy.envs import EnvSpec
from canopy.errors import ConfigError, ProtocolError
from canopy.learner.algorithms.dqn import DQN
from canopy.learner.algorithms.sac import SAC, SquashedGaussianActor
from canopy.learner.algorithms.td3 import TD3, Actor
from canopy.learner.checkpoint.state import Capturer, Snapshot, restore
from canopy.learner.model import export as _export
from canopy.learner.network import QNetwork
from canopy.learner.obsnorm import CLIP, EPSILON, ObsNorm
from canopy.learner.role import _to_batch

CPU = torch.device("cpu")
OBS = 5


def observations(seed: int = 0) -> list[np.ndarray]:
    """Batches of uneven sizes, far from zero and on very different scales per element
    (|mean| / std up to 1000: beyond ~1e5 float32 actors lose precision, see obsnorm.py)."""
    rng = np.random.default_rng(seed)
    scale = np.array([1e-2, 0.1, 1.0, 10.0, 1e3])
    offset = np.array([10.0, -3.0, 0.0, 5.0, 2e3])
    return [rng.normal(size=(n, OBS)) * scale + offset for n in (1, 7, 64, 3, 256)]


def fed(batches: list[np.ndarray]) -> ObsNorm:
    norm = ObsNorm(OBS, CPU)
    for b in batches:
        norm.update(torch.tensor(b, dtype=torch.float32))
    return norm


def test_running_statistics_equal_numpy_on_the_concatenated_observations() -> None:
    batches = observations()
    norm = fed(batches)
    # float32 observations, as replay holds them; the statistics themselves are float64.
    data = np.concatenate([b.astype(np.float32) for b in batches]).astype(np.float64)
    assert norm.count == len(data)
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.var.numpy(), data.var(axis=0), rtol=1e-9)


def test_before_any_data_observations_are_only_clipped() -> None:
    x = torch.tensor([[-50.0, -3.0, 0.0, 2.5, 11.0]])
    np.testing.assert_allclose(ObsNorm(OBS, CPU).normalize(x).numpy(), [[-10, -3, 0, 2.5, 10]], rtol=1e-6)


def test_normalized_observations_are_standardized_then_clipped_to_ten() -> None:
    norm = fed(observations())
    x = torch.tensor(np.concatenate(observations(seed=1)), dtype=torch.float32)
    z = norm.normalize(x)
    want = (x.double() - norm.mean) / torch.sqrt(norm.var + EPSILON)
    assert z.dtype == torch.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.numpy(), want.clamp(-CLIP, CLIP).numpy(), rtol=1e-6, atol=1e-6)


def probe(norm: ObsNorm, seed: int = 2) -> torch.Tensor:
    """Observations around the statistics, some of them beyond the clip on every element."""
    rng = np.random.default_rng(seed)
    std = torch.sqrt(norm.var).numpy()
    z = rng.normal(size=(200, OBS)) * 6  # |z| > 10 for about 10% of the elements
    return torch.tensor(norm.mean.numpy() + z * std, dtype=torch.float32)


@pytest.mark.parametrize("dueling", [False, True])
def test_the_published_q_network_on_raw_obs_equals_the_learners_on_normalized_obs(dueling: bool) -> None:
    torch.manual_seed(0)
    net = QNetwork(OBS, 3, [16, 8], dueling=dueling)
    norm = fed(observations())
    x = probe(norm)
    with torch.no_grad():
        want = net(norm.normalize(x)).numpy()
    folded = norm.fold(net.export())
    got = policy_from_arrays("mlp", folded).q_values(x.numpy())  # the actors' own forward pass
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # `canopy export`: a plain mlp of the same observation size, one hidden layer of 2 * OBS more.
    obs_size, actions, hidden = layer_sizes(folded)
    assert (obs_size, actions, hidden) == (OBS, 3, [2 * OBS, 16, 8])
    plain = QNetwork(obs_size, actions, hidden)
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in folded.items()})
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), want, rtol=1e-4, atol=1e-4)


def test_the_published_td3_actor_on_raw_obs_equals_the_learners_on_normalized_obs() -> None:
    torch.manual_seed(0)
    algo = TD3(OBS, 2, LearnerConfig(hidden=[16, 16]))
    norm = fed(observations())
    x = probe(norm)
    with torch.no_grad():
        want = algo.online["actor"](norm.normalize(x)).numpy()
    folded = _export(algo, norm)
    np.testing.assert_allclose(policy_from_arrays("tanh_mlp", folded).actions(x.numpy()), want, atol=1e-5)
    obs_size, actions, hidden = layer_sizes(folded)
    actor = Actor(obs_size, actions, hidden)
    actor.load_state_dict({k: torch.from_numpy(v) for k, v in folded.items()})
    with torch.no_grad():
        np.testing.assert_allclose(actor(x).numpy(), want, atol=1e-5)


def test_the_published_sac_actor_on_raw_obs_equals_the_learners_on_normalized_obs() -> None:
    torch.manual_seed(0)
    algo = SAC(OBS, 2, LearnerConfig(hidden=[16, 16]))
    actor = algo.online["actor"]
    norm = fed(observations())
    x = probe(norm)
    with torch.no_grad():
        mean, log_std = actor(norm.normalize(x))
    folded = _export(algo, norm)
    policy = policy_from_arrays(SQUASHED_GAUSSIAN_MLP, folded)
    got_mean, got_log_std = policy.mean_log_std(x.numpy())
    np.testing.assert_allclose(got_mean, mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_log_std, log_std.numpy(), atol=1e-4)  # the log std folds too
    np.testing.assert_allclose(policy.actions(x.numpy()), torch.tanh(mean).numpy(), atol=1e-5)
    # `canopy export`'s sizes: d actions (not the 2d outputs), one hidden layer of 2 * OBS more.
    obs_size, actions, hidden = layer_sizes(folded, SQUASHED_GAUSSIAN_MLP)
    assert (obs_size, actions, hidden) == (OBS, 2, [2 * OBS, 16, 16])
    plain = SquashedGaussianActor(obs_size, actions, hidden)
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in folded.items()})
    with torch.no_grad():
        np.testing.assert_allclose(plain.greedy(x).numpy(), torch.tanh(mean).numpy(), atol=1e-5)


def test_every_model_of_a_population_version_is_folded_under_its_own_prefix() -> None:
    torch.manual_seed(0)
    nets = [QNetwork(OBS, 2, [8]) for _ in range(2)]
    arrays = {f"m{k}/{name}": a for k, net in enumerate(nets) for name, a in net.export().items()}
    norm = fed(observations())
    x = probe(norm)
    models = population_arrays(norm.fold(arrays))
    assert len(models) == 2
    for net, model in zip(nets, models, strict=True):
        with torch.no_grad():
            want = net(norm.normalize(x)).numpy()
        np.testing.assert_allclose(policy_from_arrays("mlp", model).q_values(x.numpy()), want, atol=1e-4)


def test_the_statistics_round_trip_through_a_checkpoint() -> None:
    torch.manual_seed(0)
    algo = DQN(QNetwork(OBS, 2, [8]), LearnerConfig())
    norm = fed(observations())
    snap = Capturer().capture(algo, {"obs_norm": norm.state()}, {})
    wire = Snapshot.from_bytes(snap.meta_bytes(), snap.flat.numpy().tobytes())
    counters = restore(DQN(QNetwork(OBS, 2, [8]), LearnerConfig()), wire)
    again = ObsNorm(OBS, CPU)
    again.load(counters["obs_norm"])
    assert again.count == norm.count
    assert torch.equal(again.mean, norm.mean) and torch.equal(again.var, norm.var)


@pytest.mark.parametrize(
    "state",
    [
        {"count": 3, "mean": b"\0" * 8, "var": b"\0" * 8},  # one element, not five
        {"count": 3, "mean": np.zeros(OBS).tobytes()},
        {"count": -1, "mean": np.zeros(OBS).tobytes(), "var": np.ones(OBS).tobytes()},
        "not a map",
    ],
)
def test_statistics_that_do_not_fit_the_env_are_rejected(state: object) -> None:
    with pytest.raises(ProtocolError, match="obs_norm"):
        ObsNorm(OBS, CPU).load(state)


def test_the_learner_normalizes_obs_and_next_obs_of_the_batches_it_trains_on() -> None:
    obs, next_obs = torch.randn(32, OBS) * 4 + 100, torch.randn(32, OBS) * 4 + 100
    tensors = {
        "obs": obs,
        "next_obs": next_obs,
        "action": torch.zeros(32, dtype=torch.int64),
        "reward": torch.zeros(32),
        "discount": torch.ones(32),
    }
    norm = ObsNorm(OBS, CPU)
    batch = _to_batch(SimpleNamespace(tensors=tensors), False, norm)
    assert norm.count == 32
    np.testing.assert_allclose(batch.obs.mean(0).numpy(), 0, atol=1e-4)
    assert torch.equal(batch.next_obs, norm.normalize(next_obs))
    plain = _to_batch(SimpleNamespace(tensors=tensors), False)
    assert plain.obs is obs and plain.next_obs is next_obs


def test_only_learners_that_asked_get_one_and_pixel_envs_are_refused() -> None:
    spec = EnvSpec((OBS,), "float32", 2, discrete=True)
    assert ObsNorm.for_learner(EnvConfig(), spec, "mlp", CPU) is None
    assert ObsNorm.for_learner(EnvConfig(normalize_obs=True), spec, "tanh_mlp", CPU).size == OBS
    assert ObsNorm.for_learner(EnvConfig(normalize_obs=True), spec, SQUASHED_GAUSSIAN_MLP, CPU).size == OBS
    frames = EnvSpec((4, 84, 84), "uint8", 6, discrete=True)
    with pytest.raises(ConfigError, match=r"env\.normalize_obs needs flat observations"):
        ObsNorm.for_learner(EnvConfig(id="MyPixels-v0", normalize_obs=True), frames, "nature_cnn", CPU)


def test_a_layer_normed_mlp_keeps_its_norms_on_the_right_layers_when_folded() -> None:
    torch.manual_seed(0)
    net = QNetwork(OBS, 2, [8, 8], layer_norm=True)
    with torch.no_grad():
        for norm_layer in net.norms:
            norm_layer.weight.uniform_(0.5, 1.5)
            norm_layer.bias.uniform_(-0.5, 0.5)
    norm = fed(observations())
    x = probe(norm)
    with torch.no_grad():
        want = net(norm.normalize(x)).numpy()
    got = policy_from_arrays("mlp", norm.fold(net.export())).q_values(x.numpy())
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("arch", [CATEGORICAL_MLP, GAUSSIAN_MLP])
def test_a_stochastic_policy_folds_like_an_mlp_and_keeps_its_log_std(arch: str) -> None:
    torch.manual_seed(0)
    net = QNetwork(OBS, 3, [16, 8])  # the logits / the Gaussian's mean
    log_std = np.array([-0.5, 0.0, 0.25], np.float32)
    arrays = net.export() | ({"log_std": log_std} if arch == GAUSSIAN_MLP else {})
    norm = fed(observations())
    x = probe(norm)
    with torch.no_grad():
        want = net(norm.normalize(x)).numpy()
    folded = norm.fold(arrays)
    unfolded = policy_from_arrays(arch, arrays).q_values(norm.normalize(x).numpy())
    got = policy_from_arrays(arch, folded)
    np.testing.assert_allclose(got.q_values(x.numpy()), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.q_values(x.numpy()), unfolded, rtol=1e-4, atol=1e-4)
    assert layer_sizes(folded) == (OBS, 3, [2 * OBS, 16, 8])
    if arch == GAUSSIAN_MLP:
        np.testing.assert_array_equal(folded["log_std"], log_std)
        assert list(folded)[-1] == "log_std"  # after the layers, as `canopy export` orders them
        np.testing.assert_allclose(got.actions(x.numpy()), np.clip(want, -1, 1), rtol=1e-4, atol=1e-4)
    else:
        assert "log_std" not in folded


def test_a_population_of_gaussian_policies_keeps_each_models_log_std() -> None:
    torch.manual_seed(0)
    nets = [QNetwork(OBS, 2, [8]) for _ in range(2)]
    arrays = {
        f"m{k}/{name}": a
        for k, net in enumerate(nets)
        for name, a in (net.export() | {"log_std": np.full(2, -k, np.float32)}).items()
    }
    models = population_arrays(fed(observations()).fold(arrays))
    for k, model in enumerate(models):
        np.testing.assert_array_equal(model["log_std"], np.full(2, -k, np.float32))
        assert policy_from_arrays(GAUSSIAN_MLP, model).std.tolist() == pytest.approx([np.exp(-k)] * 2)


def test_stochastic_policies_may_normalize_observations() -> None:
    spec = EnvSpec((OBS,), "float32", 2, discrete=True)
    for arch in (CATEGORICAL_MLP, GAUSSIAN_MLP):
        assert ObsNorm.for_learner(EnvConfig(normalize_obs=True), spec, arch, CPU).size == OBS
