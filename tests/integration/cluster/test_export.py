"""cluster/export.py: `canopy export` and `canopy eval` against a run's real Redis root,
live and after the run stopped (its persisted shard is started from RUN_DIR/redis-0)."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import free_port, stop_process, wait_for

from canopy import config as config_mod
from canopy.arch import CATEGORICAL_MLP, GAUSSIAN_MLP, SQUASHED_GAUSSIAN_MLP
from canopy.cache import blob
from canopy.cluster import export, redis_server
from canopy.cluster.connection import from_run_dir
from canopy.config import EnvConfig
from canopy.keys import Keys
from canopy.learner.network import ARCH, QNetwork
from canopy.learner.publisher import Publisher
from canopy.redisconn import connect
from canopy.version import Version

RUN = "export-test"


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[tuple[Path, QNetwork, subprocess.Popen]]:
    """A run directory whose persisted Redis root holds one published CartPole policy."""
    password_file = tmp_path / "redis.password"
    password_file.write_text(secrets.token_urlsafe(16))
    cfg = config_mod.load(
        None,
        [
            f'run.name="{RUN}"',
            f'run.dir="{tmp_path}"',
            f'cluster.redis=["127.0.0.1:{free_port()}"]',
            f'cluster.password_file="{password_file}"',
        ],
    )
    config_mod.save(cfg, tmp_path / "config.toml")
    (tmp_path / "cluster.json").write_text(json.dumps({"run": RUN, "config": str(tmp_path / "config.toml")}))
    conf = redis_server.write_conf(cfg, 0)
    proc = subprocess.Popen([redis_server.binary(), str(conf)], stdout=subprocess.DEVNULL)
    r = connect(cfg.cluster, "test", 0)
    try:
        wait_for(lambda: _pings(r), 10, what="redis-server")
        torch.manual_seed(3)
        net = QNetwork(4, 2, [32, 32])
        publisher = Publisher(r, Keys(RUN), learner_id=0, keep=2)
        publisher.publish(net.export(), step=7, arch=ARCH)
        # As the evaluator does: version 7 confirmed and pinned as the best; a newer one follows.
        manifest, chunks = blob.read(r, Keys(RUN), Version(publisher.epoch, 7))
        blob.pin(r, Keys(RUN), blob.unpack(manifest, chunks), manifest, {"mean": 123.0, "episodes": 100})
        publisher.publish(QNetwork(4, 2, [32, 32]).export(), step=9, arch=ARCH)
        yield tmp_path, net, proc
    finally:
        r.close()
        stop_process(proc)


def _pings(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


def q_of(net: QNetwork, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(obs)).numpy()


OBS = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)


def test_safetensors_export_loads_without_canopy_and_gives_the_same_q_values(run_dir, tmp_path: Path) -> None:
    path, net, _ = run_dir
    out = export.export(from_run_dir(path), str(tmp_path / "policy.safetensors"), "safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(out))
    plain = torch.nn.Sequential(
        torch.nn.Linear(4, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 2),
    )
    plain.load_state_dict({f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in state.items()})
    with torch.no_grad():
        np.testing.assert_allclose(plain(torch.from_numpy(OBS)).numpy(), q_of(net, OBS), rtol=1e-6)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["env"] == "CartPole-v1" and meta["version"].endswith(".7")


def test_torchscript_export_runs_with_torch_jit_load(run_dir, tmp_path: Path) -> None:
    path, net, _ = run_dir
    out = export.export(from_run_dir(path), str(tmp_path / "policy.pt"), "torchscript")
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(torch.from_numpy(OBS)).numpy(), q_of(net, OBS), rtol=1e-6)


def test_a_stopped_run_is_exported_from_its_persisted_redis(run_dir, tmp_path: Path) -> None:
    path, net, proc = run_dir
    stop_process(proc)  # SIGTERM: the shard flushes its append-only file and exits
    out = export.export(from_run_dir(path), str(tmp_path / "after.safetensors"), "safetensors")
    arrays, _ = export.load_file(out)
    for name, value in net.export().items():
        np.testing.assert_array_equal(arrays[name], value)


def test_eval_plays_greedy_episodes_from_a_run_and_from_an_exported_file(run_dir, tmp_path: Path) -> None:
    path, _, _ = run_dir
    from_run = export.evaluate(from_run_dir(path), episodes=3, seed=5)
    out = export.export(from_run_dir(path), str(tmp_path / "p.safetensors"), "safetensors")
    from_file = export.evaluate(str(out), episodes=3, seed=5)
    assert from_run["mean_return"] == from_file["mean_return"] > 0  # same policy, same seeds
    assert from_file["env"] == "CartPole-v1"


def test_eval_records_the_first_episode_as_a_gif(run_dir, tmp_path: Path) -> None:
    pytest.importorskip("pygame", reason="CartPole renders with pygame: pip install 'canopy-rl[video]'")
    path, _, _ = run_dir
    result = export.evaluate(from_run_dir(path), episodes=1, seed=5, video=str(tmp_path / "ep.gif"))
    from PIL import Image

    with Image.open(tmp_path / "ep.gif") as gif:
        assert gif.n_frames == int(result["mean_return"])  # one frame per step of the episode


def test_an_unknown_format_and_a_non_policy_file_are_one_line_errors(run_dir, tmp_path: Path) -> None:
    from canopy.errors import UserError

    path, _, _ = run_dir
    with pytest.raises(UserError, match="unknown export format"):
        export.export(from_run_dir(path), str(tmp_path / "x"), "onnx")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="canopy export"):
        export.evaluate(str(tmp_path / "junk.safetensors"), episodes=1, seed=0, env_id="CartPole-v1")


def test_the_best_confirmed_version_is_handed_over_unless_another_is_asked_for(run_dir, tmp_path) -> None:
    path, net, _ = run_dir
    best = export.evaluate(from_run_dir(path), episodes=2, seed=5)
    newest = export.evaluate(from_run_dir(path), episodes=2, seed=5, version="newest")
    assert best["version"].endswith(".7") and newest["version"].endswith(".9")
    out = export.export(from_run_dir(path), str(tmp_path / "best.safetensors"), "safetensors")
    arrays, meta = export.load_file(out)
    assert meta["version"].endswith(".7") and meta["eval_mean"] == "123.0" and meta["eval_episodes"] == "100"
    for name, value in net.export().items():
        np.testing.assert_array_equal(arrays[name], value)
    run = from_run_dir(path)
    by_id = export.export(run, str(tmp_path / "v9.st"), "safetensors", version=newest["version"])
    assert export.load_file(by_id)[1]["version"] == newest["version"]


def test_a_pinned_best_outlives_the_trimming_of_old_versions(run_dir) -> None:
    path, net, _ = run_dir
    cfg = config_mod.load(path / "config.toml")
    r = connect(cfg.cluster, "test", 0)
    try:
        publisher = Publisher(r, Keys(RUN), learner_id=0, keep=2)
        for step in (11, 13, 15):  # keep=2: version 7's own blob is long gone
            publisher.publish(QNetwork(4, 2, [32, 32]).export(), step=step, arch=ARCH)
        taken = export.handover(r, Keys(RUN), "best")
    finally:
        r.close()
    assert str(taken.manifest.version).endswith(".7") and taken.record["mean"] == "123.0"
    for name, value in net.export().items():
        np.testing.assert_array_equal(taken.arrays[name], value)


def test_without_a_confirmed_version_best_says_to_ask_for_the_newest(run_dir) -> None:
    from canopy.errors import UserError

    path, _, _ = run_dir
    cfg = config_mod.load(path / "config.toml")
    r = connect(cfg.cluster, "test", 0)
    try:
        r.delete(Keys(RUN).best)
        with pytest.raises(UserError, match="--version newest"):
            export.handover(r, Keys(RUN), "best")
    finally:
        r.close()


# On-policy learners (ppo, impala) publish the policy network itself: logits for Discrete
# actions, a Gaussian's mean and a `log_std` for Box ones; sac its actor, a Gaussian's mean
# and log std side by side. These need no Redis: they hand a version straight to `write_policy`.


def stochastic(
    arch: str, obs_size: int, d: int, hidden: list[int], scale: float = 1.0
) -> dict[str, np.ndarray]:
    """A policy's published arrays; the last layer's weights times `scale` (means beyond [-1, 1])."""
    torch.manual_seed(4)
    net = QNetwork(obs_size, 2 * d if arch == SQUASHED_GAUSSIAN_MLP else d, hidden)
    with torch.no_grad():
        net.layers[-1].weight.mul_(scale)
    arrays = net.export()
    if arch == GAUSSIAN_MLP:
        arrays["log_std"] = np.linspace(-1.0, 0.5, d).astype(np.float32)
    return arrays


def handed(arch: str, arrays: dict[str, np.ndarray]) -> export.Handover:
    layout = [(name, "float32", a.shape, 0) for name, a in arrays.items()]
    manifest = blob.Manifest(Version(1, 5), 0, "", 0, layout, arch)
    return export.Handover(manifest, arrays, 0, {"mean": "-150.0", "episodes": "10"})


def greedy(arch: str, arrays: dict[str, np.ndarray], obs: np.ndarray) -> np.ndarray:
    """The evaluator's actions (`Explorer.greedy`) with the policy of `arrays`."""
    from canopy.actors.explore import Explorer
    from canopy.actors.policy import policy_from_arrays

    space = gym.spaces.Discrete(3) if arch == CATEGORICAL_MLP else gym.spaces.Box(-2.0, 2.0, (3,), np.float32)
    return Explorer(space, len(obs), np.random.default_rng(0)).greedy(policy_from_arrays(arch, arrays), obs)


@pytest.mark.parametrize("arch", [CATEGORICAL_MLP, GAUSSIAN_MLP, SQUASHED_GAUSSIAN_MLP])
def test_a_stochastic_policy_round_trips_through_safetensors(arch: str, tmp_path: Path) -> None:
    # Eleven layers: safetensors stores names sorted, "layers.10" before "layers.2".
    arrays = stochastic(arch, 4, 3, [8] * 10, scale=8.0)
    out = export.write_policy(handed(arch, arrays), EnvConfig(id="Pendulum-v1"), tmp_path / "p.st")
    loaded, meta = export.load_file(out)
    assert list(loaded) == list(arrays)  # layers in order, weight before bias, log_std after
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert meta["arch"] == arch and meta["env"] == "Pendulum-v1" and meta["eval_mean"] == "-150.0"
    assert (meta["obs_size"], meta["n_actions"], json.loads(meta["hidden"])) == ("4", "3", [8] * 10)
    obs = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    np.testing.assert_array_equal(greedy(meta["arch"], loaded, obs), greedy(arch, arrays, obs))


def test_a_categorical_policy_exports_to_torchscript_as_its_logits(tmp_path: Path) -> None:
    from canopy.actors.policy import policy_from_arrays

    arrays = stochastic(CATEGORICAL_MLP, 4, 3, [16, 16])
    out = export.write_policy(handed(CATEGORICAL_MLP, arrays), EnvConfig(), tmp_path / "p.pt", "torchscript")
    with torch.no_grad():
        logits = torch.jit.load(str(out))(torch.from_numpy(OBS)).numpy()
    np.testing.assert_allclose(logits, policy_from_arrays(CATEGORICAL_MLP, arrays).q_values(OBS), atol=1e-5)


def test_a_gaussian_policy_exports_to_torchscript_as_its_greedy_action(tmp_path: Path) -> None:
    from canopy.actors.policy import policy_from_arrays

    arrays = stochastic(GAUSSIAN_MLP, 4, 3, [16, 16], scale=8.0)
    out = export.write_policy(handed(GAUSSIAN_MLP, arrays), EnvConfig(), tmp_path / "p.pt", "torchscript")
    with torch.no_grad():
        got = torch.jit.load(str(out))(torch.from_numpy(OBS)).numpy()
    policy = policy_from_arrays(GAUSSIAN_MLP, arrays)
    assert (np.abs(policy.q_values(OBS)) > 1).any()  # the clamp is exercised
    np.testing.assert_allclose(got, policy.actions(OBS), atol=1e-5)


def test_a_squashed_gaussian_policy_exports_to_torchscript_as_tanh_of_its_mean(tmp_path: Path) -> None:
    from canopy.actors.policy import policy_from_arrays

    arrays = stochastic(SQUASHED_GAUSSIAN_MLP, 4, 3, [16, 16], scale=8.0)
    out = export.write_policy(
        handed(SQUASHED_GAUSSIAN_MLP, arrays), EnvConfig(), tmp_path / "p.pt", "torchscript"
    )
    with torch.no_grad():
        got = torch.jit.load(str(out))(torch.from_numpy(OBS)).numpy()
    policy = policy_from_arrays(SQUASHED_GAUSSIAN_MLP, arrays)
    assert got.shape == (len(OBS), 3)  # d actions, not the 2d outputs
    np.testing.assert_allclose(got, policy.actions(OBS), atol=1e-5)
    np.testing.assert_allclose(got, np.tanh(policy.q_values(OBS)[:, :3]), atol=1e-5)


@pytest.mark.parametrize("arch", [GAUSSIAN_MLP, SQUASHED_GAUSSIAN_MLP])
def test_canopy_eval_plays_an_exported_gaussian_policy(arch: str, tmp_path: Path) -> None:
    arrays = stochastic(arch, 3, 1, [16])  # Pendulum: 3 observations, 1 action
    out = export.write_policy(handed(arch, arrays), EnvConfig(id="Pendulum-v1"), tmp_path / "p.st")
    result = export.evaluate(str(out), episodes=2, seed=5)
    assert result["env"] == "Pendulum-v1" and np.isfinite(result["mean_return"]) and result["mean_return"] < 0


def test_a_file_without_layers_is_a_one_line_error(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from canopy.errors import UserError

    save_file({"log_std": np.zeros(3, np.float32)}, str(tmp_path / "std.safetensors"))
    with pytest.raises(UserError, match="canopy export"):
        export.load_file(tmp_path / "std.safetensors")
