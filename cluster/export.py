"""`canopy export` and `canopy eval`: a run's policy out of Redis, into a file or an episode.

Place in the data flow: after (or during) training. What a run hands over is its best
confirmed version: the one the evaluator judged best over `eval.confirm_episodes` fresh
episodes, pinned at the Redis root (`eval:best`, cache/blob.py `pin`) so it outlives the
trimming of old versions; `--version newest` takes `model:latest` instead, `--version ID`
any version still kept. The run is a `canopy up` run directory, a deployment's TOML or a
Redis address (cluster/connection.py); a `canopy up` run that has stopped still has them in
its persisted shard (RUN_DIR/redis-0), which these commands start on a free loopback port
for as long as they read. The policy leaves canopy as
- safetensors: the published network's arrays (a Q-network's or policy's state_dict, and a
  `gaussian_mlp`'s `log_std`) plus metadata (env id, version, arch, layer sizes), loadable
  with `safetensors.torch.load_file` into `torch.nn.Linear` layers;
- TorchScript: the network itself, loadable with `torch.jit.load` without canopy: Q-values,
  logits (`categorical_mlp`), or the greedy action (`tanh_mlp`; `gaussian_mlp`: the mean
  clamped to [-1, 1]; `squashed_gaussian_mlp`: tanh of the mean, its first d outputs).
`canopy eval` plays greedy episodes with a run's policy or an exported safetensors file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import redis

from canopy import config as config_mod
from canopy.arch import GAUSSIAN_MLP, MLP, SQUASHED_GAUSSIAN_MLP, TANH_MLP
from canopy.cache import blob
from canopy.cluster.connection import Target, require_config
from canopy.cluster.progress import waiting
from canopy.config import EnvConfig
from canopy.errors import ProtocolError, UserError
from canopy.keys import Keys
from canopy.ports import free_ports
from canopy.redisconn import connect
from canopy.version import Version

FORMATS = ("safetensors", "torchscript")
REDIS_START_S = 30.0  # loading a large append-only file takes a while


@contextlib.contextmanager
def run_redis(target: Target) -> Iterator[tuple[redis.Redis, Keys, config_mod.Config]]:
    """The run's root shard: the live one when it answers, else (a `canopy up` run directory
    only) its persisted copy."""
    r = target.client("export")
    try:
        live = bool(r.ping())
    except redis.ConnectionError:
        live = False
    if live:
        try:
            yield r, target.keys, target.cfg
        finally:
            r.close()
        return
    r.close()
    if target.run_dir is None:
        raise UserError(f"cannot reach the run's Redis root at {target.where()}: is the run up?")
    conf = target.run_dir / "redis-0" / "redis.conf"
    if not conf.is_file():
        raise UserError(f"the run's Redis is down and {conf} does not exist: nothing to read the policy from")
    port = free_ports(1)[0]
    # Port and bind overridden, so a copy never collides with the run should it come back.
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            str(conf),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    copy = replace(target.cfg.cluster, redis=[f"127.0.0.1:{port}"])
    r = connect(copy, "export", 0)
    try:
        deadline = time.monotonic() + REDIS_START_S
        while True:
            try:
                r.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise UserError(f"could not start the run's persisted Redis from {conf}") from None
                time.sleep(0.05)
        yield r, target.keys, target.cfg
    finally:
        r.close()
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Handover:
    """A policy version taken out of a run, and what the evaluator said of it (best only)."""

    manifest: blob.Manifest
    arrays: dict[str, np.ndarray]
    model: int  # the model of a population the evaluator confirmed (0 for one model)
    record: dict[str, str]  # the confirmation: mean, std, min, episodes, confirmed_at


def handover(r: redis.Redis, keys: Keys, version: str = "best") -> Handover:
    """`best` (the pinned best confirmed version), `newest`, or a version id still kept."""
    if version != "best":
        manifest, arrays = read_policy(r, keys, "" if version == "newest" else version)
        return Handover(manifest, arrays, 0, {})
    try:
        manifest, chunks, record = blob.read_pinned(r, keys)
    except ProtocolError as exc:
        raise UserError(f"{exc}: wait for a confirmed evaluation, or pass --version newest") from None
    model = int(record.get("model", "0")) if record.get("model", "0").isdigit() else 0
    return Handover(manifest, blob.unpack(manifest, chunks), model, record)


def read_policy(r: redis.Redis, keys: Keys, version: str = "") -> tuple[blob.Manifest, dict[str, np.ndarray]]:
    """A version's manifest and float32 arrays (the newest when `version` is empty)."""
    raw = version or r.get(keys.model_latest)
    if not raw:
        raise UserError("no policy version was published in this run yet")
    manifest, chunks = blob.read(r, keys, Version.parse(raw))
    base = None
    if manifest.codec == "int8delta":
        base_manifest, base_chunks = blob.read(r, keys, Version.parse(manifest.base))
        base = blob.decode(base_manifest, base_chunks)
    return manifest, blob.unpack(manifest, chunks, base)


def layer_sizes(arrays: dict[str, np.ndarray], arch: str = MLP) -> tuple[int, int, list[int]]:
    """(observation size, actions, hidden widths) of an `mlp` from its weight shapes; arrays
    that are not a linear layer's (a `gaussian_mlp`'s `log_std`) do not count. A
    `squashed_gaussian_mlp` has 2 outputs per action (mean, log std)."""
    weights = [a for name, a in arrays.items() if name.startswith("layers.") and name.endswith(".weight")]
    if not weights or any(w.ndim != 2 for w in weights):
        raise ProtocolError("the policy is not an mlp of linear layers")
    outputs = weights[-1].shape[0]
    actions = outputs // 2 if arch == SQUASHED_GAUSSIAN_MLP else outputs
    return weights[0].shape[1], actions, [w.shape[0] for w in weights[:-1]]


def pick_model(arrays: dict[str, np.ndarray], model: int) -> dict[str, np.ndarray]:
    """Model `model` of a population version (`learner.models > 1`); a single model is model 0."""
    from canopy.actors.policy import population_arrays

    models = population_arrays(arrays)
    if not 0 <= model < len(models):
        raise UserError(f"--model {model}: this version holds models 0..{len(models) - 1}")
    return models[model]


def export(target: Target, out: str, fmt: str, version: str = "best", model: int | None = None) -> Path:
    """Write a run's policy (`version`: best | newest | an id) to `out`; `model`: default, the
    confirmed model of a population's best version, else model 0."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    require_config(target, "export")  # the file names the run's env
    with run_redis(target) as (r, keys, cfg):
        taken = handover(r, keys, version)
    return write_policy(taken, cfg.env, Path(out), fmt, taken.model if model is None else model)


def write_policy(
    taken: Handover, env: EnvConfig, path: Path, fmt: str = "safetensors", model: int = 0
) -> Path:
    """One model of a handed-over version as safetensors (with its confirmation) or TorchScript."""
    import torch
    from safetensors.torch import save_file

    from canopy.learner.algorithms.sac import Greedy, SquashedGaussianActor
    from canopy.learner.algorithms.td3 import Actor
    from canopy.learner.network import QNetwork

    manifest = taken.manifest
    arrays = pick_model(taken.arrays, model)
    obs_size, n_actions, hidden = layer_sizes(arrays, manifest.arch)
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    if fmt == "safetensors":
        meta = {
            "env": env.id,
            "env_kwargs": json.dumps(env.kwargs),  # `canopy eval FILE` builds the env the same way
            "version": str(manifest.version),
            "arch": manifest.arch,
            "obs_size": str(obs_size),
            "n_actions": str(n_actions),
            "hidden": json.dumps(hidden),
            "model": str(model),
            **{f"eval_{k}": v for k, v in taken.record.items() if k in ("mean", "std", "min", "episodes")},
        }
        save_file(state, str(path), metadata=meta)
    else:
        if manifest.arch == TANH_MLP:
            net = Actor(obs_size, n_actions, hidden)
            net.load_state_dict(state)
        elif manifest.arch == GAUSSIAN_MLP:
            # The greedy action, as `canopy eval` and the evaluator take it: the mean clamped
            # to the action box (Hardtanh is that clamp); log_std only matters for sampling.
            mean = QNetwork(obs_size, n_actions, hidden)
            mean.load_state_dict({k: v for k, v in state.items() if k != "log_std"})
            net = torch.nn.Sequential(mean, torch.nn.Hardtanh(-1.0, 1.0))
        elif manifest.arch == SQUASHED_GAUSSIAN_MLP:
            # tanh of the first d outputs (the mean); the log std only matters for sampling.
            actor = SquashedGaussianActor(obs_size, n_actions, hidden)
            actor.load_state_dict(state)
            net = Greedy(actor)
        else:  # mlp: Q-values; categorical_mlp: logits (their argmax is the greedy action)
            net = QNetwork(obs_size, n_actions, hidden)
            net.load_state_dict(state)
        # Traced, not scripted: the MLP has no data-dependent control flow.
        torch.jit.trace(net.eval(), torch.zeros(1, obs_size)).save(str(path))
    return path


def load_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and metadata of an exported safetensors file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file as load_np

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        arrays = load_np(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {path} as an exported policy ({exc}): use `canopy export`") from None
    # safetensors stores names sorted; the policy needs layer order, weight before bias.
    layers = sorted((k for k in arrays if _layer_index(k) is not None), key=_layer_order)
    if not layers:
        raise UserError(f"{path} does not hold layers.<i>.weight/bias tensors: use `canopy export`")
    others = sorted(k for k in arrays if _layer_index(k) is None)  # a gaussian_mlp's log_std
    return {k: arrays[k] for k in [*layers, *others]}, meta


def _layer_index(name: str) -> int | None:
    """i of a `layers.<i>.<kind>` array name, None for any other name."""
    prefix, index, kind = [*name.split("."), "", ""][:3]
    ok = prefix == "layers" and index.isdigit() and bool(kind) and name.count(".") == 2
    return int(index) if ok else None


def _layer_order(name: str) -> tuple[int, int, str]:
    """Sort key of a layer array: its layer, then weight, bias, then the rest (layer norms)."""
    kind = name.rsplit(".", 1)[1]
    return _layer_index(name) or 0, {"weight": 0, "bias": 1}.get(kind, 2), kind


def evaluate(
    source: Target | str,
    episodes: int,
    seed: int,
    env_id: str = "",
    video: str = "",
    model: int | None = None,
    version: str = "best",
) -> dict:
    """Greedy returns of `episodes` episodes (seeds seed, seed+1, ...) with a run's policy
    (`version`: best | newest | an id) or an exported file, all episodes in one vector env."""
    from canopy.actors.evaluator import judge
    from canopy.envs import check_env_id

    env_cfg = EnvConfig(id=env_id)
    from_run = isinstance(source, Target)
    if isinstance(source, Target):
        if not env_id:
            require_config(source, "eval without --env")
        with run_redis(source) as (r, keys, cfg):
            taken = handover(r, keys, version)
        model = taken.model if model is None else model
        arrays = {k: np.array(v) for k, v in pick_model(taken.arrays, model).items()}
        env_cfg = cfg.env if not env_id or env_id == cfg.env.id else env_cfg
        version, arch = str(taken.manifest.version), taken.manifest.arch
    else:
        path = Path(source)
        arrays, meta = load_file(path)
        env_cfg.id = env_id or meta.get("env", "")
        if env_cfg.id == meta.get("env"):
            env_cfg.kwargs = _kwargs_of(meta)
        version, arch = meta.get("version", "?"), meta.get("arch", MLP)
        if not env_cfg.id:
            raise UserError(f"{path} names no environment: pass --env ID")
    check_env_id(env_cfg.id)
    if video:
        write_gif(_first_episode_frames(env_cfg, arch, arrays, seed), Path(video))
    with waiting(f"{episodes} greedy episodes of {env_cfg.id}"):
        score = judge(arch, arrays, env_cfg, episodes, seed)
    return {
        "env": env_cfg.id,
        "version": version,
        **({"model": model} if from_run else {}),
        "episodes": episodes,
        "mean_return": score["mean"],
        "std_return": score["std"],
        "min_return": score["min"],
        "max_return": score["max"],
        **({"video": video} if video else {}),
    }


def _kwargs_of(meta: dict[str, str]) -> dict:
    """The env.kwargs an exported file was trained with (none in files from older versions)."""
    try:
        kwargs = json.loads(meta.get("env_kwargs") or "{}")
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise UserError("the file's env_kwargs metadata is not a JSON object: export it again")
    return kwargs


def _first_episode_frames(
    env_cfg: EnvConfig, arch: str, arrays: dict[str, np.ndarray], seed: int
) -> list[np.ndarray]:
    """Rendered frames of one greedy episode on `seed` (the first episode `evaluate` scores)."""
    import gymnasium as gym

    from canopy.actors.explore import Explorer
    from canopy.actors.policy import policy_from_arrays
    from canopy.envs import make_one

    env_id = env_cfg.id
    policy = policy_from_arrays(arch, arrays)
    env = make_one(env_id, env_cfg, render_mode="rgb_array")
    explorer = Explorer(env.action_space, 1, np.random.default_rng(seed))
    frames: list[np.ndarray] = []
    try:
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:  # one frame per step: the state each action was taken in
            try:
                frames.append(env.render())
            except gym.error.DependencyNotInstalled as exc:
                raise UserError(f"--video needs rendering for {env_id}: {exc}") from None
            obs, _, terminated, truncated, _ = env.step(explorer.greedy(policy, np.asarray(obs)[None])[0])
            done = terminated or truncated
    finally:
        env.close()
    return frames


def write_gif(frames: list[np.ndarray], path: Path, fps: int = 30) -> None:
    """The first episode as an animated GIF (pillow ships with matplotlib; no video codec needed)."""
    from PIL import Image

    if not frames:
        raise UserError("the environment rendered no frames")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
