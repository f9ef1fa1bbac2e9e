"""`canopy bench actors`: env steps/s of one actor process's acting loop against the
ceiling, plain gymnasium vector-env stepping with random actions, in the same run.

Place in the data flow: the actor's loop without its sockets (actors/actor.py): one
batched numpy forward pass over the whole vector env, epsilon-greedy per sub-env, and
the n-step adder building insert chunks. The ratio says what inference and transition
building cost on top of the environment itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode

from canopy.actors.adder import NStepAdder
from canopy.actors.policy import MLPPolicy, NatureCNNPolicy, limit_blas_threads, policy_from_arrays
from canopy.cluster.bench import harness, report
from canopy.envs import make_vec, random_stepping_rate
from canopy.learner.network import build


def random_policy(env: Any) -> MLPPolicy | NatureCNNPolicy:
    """The actor's forward pass for this env's network, with freshly initialised weights."""
    import torch

    torch.manual_seed(0)
    space = env.single_observation_space
    net, arch = build(tuple(space.shape), str(space.dtype), int(env.single_action_space.n), [128, 128], False)
    return policy_from_arrays(arch, net.export())


def acting(env_id: str, envs: int, seconds: float, chunk: int = 64) -> float:
    """Env steps/s of the actor's loop (forward pass, epsilon-greedy, n-step adder) over `seconds`."""
    env = make_vec(env_id, envs)
    try:
        n_actions = int(env.single_action_space.n)
        obs, _ = env.reset(seed=0)
        policy = random_policy(env)
        rng = np.random.default_rng(0)
        eps = np.full(envs, 0.1)
        adder = NStepAdder(envs, 3, 0.99, AutoresetMode.NEXT_STEP)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            greedy = policy.q_values(obs).argmax(axis=1)
            actions = np.where(rng.random(envs) < eps, rng.integers(n_actions, size=envs), greedy)
            next_obs, rewards, terminated, truncated, info = env.step(actions)
            adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, 1)
            obs = next_obs
            adder.take(chunk)
            steps += envs
        return steps / (time.perf_counter() - start)
    finally:
        env.close()


def main(args: argparse.Namespace) -> int:
    """Each env and `--envs` size against its random-stepping ceiling; the report goes to `--json`."""
    limit_blas_threads()  # as every actor process does
    envs_ids = ["CartPole-v1"]
    skipped = {}
    if importlib.util.find_spec("ale_py") and importlib.util.find_spec("cv2"):
        envs_ids.append("ALE/Pong-v5")
    else:
        skipped["ALE/Pong-v5"] = "ale-py or opencv is not installed: pip install 'canopy-rl[atari]'"
    figures: dict[str, dict] = {}
    with harness.progress() as progress:
        task = progress.add_task("actor bench", total=2 * len(envs_ids) * len(args.envs))
        for env_id in envs_ids:
            for n in args.envs:
                top = random_stepping_rate(env_id, n, args.seconds)
                progress.advance(task)
                got = acting(env_id, n, args.seconds)
                progress.advance(task)
                figures[f"{env_id.removeprefix('ALE/')}_x{n}"] = {
                    "env_steps_per_s": round(got),
                    "baseline_random_vector_env_steps_per_s": round(top),
                    "ratio_to_ceiling": round(got / top, 3),
                }
    checks = [
        report.check(
            f"{key}: env steps/s per actor process",
            f["env_steps_per_s"],
            "steps/s",
            "report (issue 6 sets no goal); ceiling = random actions in the same vector env",
            f["baseline_random_vector_env_steps_per_s"],
            f["ratio_to_ceiling"] >= 0.5,
        )
        for key, f in figures.items()
    ]
    checks += [
        report.check(f"{k}: env steps/s", None, "steps/s", why, None, False) for k, why in skipped.items()
    ]
    report.write(args.json, "actors", {"workloads": figures, "skipped": skipped}, checks)
    return 0
