"""`canopy bench e2e`: time-to-solve of a whole `canopy up` run per seed, beside SB3 PPO.

Each seed starts the cluster from nothing (`canopy up` in a subprocess) and stops when a
greedy evaluation of >= 10 episodes reaches the threshold. The baseline, when
stable-baselines3 is installed, is PPO with the rl-zoo CartPole-v1 hyperparameters, run
in the same invocation and timed to a mean training return >= threshold over its last
100 episodes (a looser judge than canopy's greedy evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from canopy.cluster.bench import harness, report

GOAL_MEDIAN_S = 30.0
SB3_MAX_STEPS = 200_000


def run_canopy(
    env: str,
    seed: int,
    threshold: float,
    time_limit: float,
    sets: list[str],
    run_dir: Path,
    on_progress: Callable[[str], None],
) -> dict:
    """One `canopy up` to the threshold; `on_progress` gets its newest metrics row as text."""
    cmd = harness.up_command(
        env, run_dir, seed=seed, stop_at_return=threshold, time_limit=time_limit, sets=sets
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = run_dir.with_suffix(".stderr")
    with open(stderr_path, "wb") as stderr:
        code = harness.watch(
            cmd,
            subprocess.DEVNULL,
            stderr,
            time_limit + 180,
            lambda: on_progress(harness.latest_row(run_dir)),
        )
    if code != 0:
        return {"seed": seed, "solved": False, "error": harness.last_lines(stderr_path)}
    summary = json.loads((run_dir / "summary.json").read_text())
    keep = (
        "solved",
        "time_to_solve_s",
        "env_steps_to_solve",
        "final_eval_return",
        "versions_published",
        "updates",
        "wall_s",
    )
    return {"seed": seed, **{k: summary[k] for k in keep}}


def run_sb3_ppo(env_id: str, seed: int, threshold: float) -> dict:
    """rl-zoo's CartPole-v1 PPO: 8 envs, n_steps 32, batch 256, 20 epochs, lr and clip 1e-3/0.2 linear."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    class StopAtReturn(BaseCallback):
        solved_at: tuple[float, int] | None = None

        def _on_step(self) -> bool:
            infos = self.model.ep_info_buffer
            if len(infos) >= 100 and sum(i["r"] for i in infos) / len(infos) >= threshold:
                self.solved_at = (time.monotonic() - t0, self.num_timesteps)
                return False
            return True

    def linear(start: float) -> Callable[[float], float]:
        return lambda progress: progress * start

    t0 = time.monotonic()
    env = make_vec_env(env_id, n_envs=8, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        seed=seed,
        verbose=0,
    )
    callback = StopAtReturn()
    model.learn(total_timesteps=SB3_MAX_STEPS, callback=callback)
    if callback.solved_at is None:
        return {"seed": seed, "solved": False, "wall_s": round(time.monotonic() - t0, 2)}
    return {
        "seed": seed,
        "solved": True,
        "time_to_solve_s": round(callback.solved_at[0], 2),
        "env_steps_to_solve": callback.solved_at[1],
    }


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get("solved")]
    return statistics.median(values) if len(values) == len(rows) and rows else None


def main(args: argparse.Namespace) -> int:
    """Every seed through `canopy up` (and SB3 PPO when installed); the report goes to `--json`."""
    seeds = list(range(args.seeds))
    ours: list[dict] = []
    baseline: list[dict] = []
    try:
        import stable_baselines3  # noqa: F401

        have_sb3 = not args.no_baseline
    except ImportError:
        have_sb3 = False
    with harness.scratch_dir("canopy-bench-") as tmp, harness.progress() as bar:
        task = bar.add_task("canopy up per seed", total=len(seeds) * (2 if have_sb3 else 1))
        for seed in seeds:

            def show(text: str, seed: int = seed) -> None:
                bar.update(task, description=f"canopy up, seed {seed}: {text}")

            show("starting")
            run_dir = tmp / f"seed-{seed}"
            ours.append(run_canopy(args.env, seed, args.threshold, args.time_limit, args.set, run_dir, show))
            bar.advance(task)
            if have_sb3:
                bar.update(task, description=f"SB3 PPO baseline, seed {seed}")
                baseline.append(run_sb3_ppo(args.env, seed, args.threshold))
                bar.advance(task)

    median_s = _median(ours, "time_to_solve_s")
    base_median = _median(baseline, "time_to_solve_s") if baseline else None
    solved = sum(1 for r in ours if r.get("solved"))
    figures: dict[str, Any] = {
        "env": args.env,
        "threshold": args.threshold,
        "judge": "greedy evaluation, >= 10 episodes, epsilon 0",
        "seeds": ours,
        "median_time_to_solve_s": median_s,
        "median_env_steps_to_solve": _median(ours, "env_steps_to_solve"),
        "baseline": {
            "name": "stable-baselines3 PPO, rl-zoo CartPole-v1 hyperparameters",
            "judge": "mean training return over the last 100 episodes",
            "available": have_sb3,
            "seeds": baseline,
            "median_time_to_solve_s": base_median,
            "median_env_steps_to_solve": _median(baseline, "env_steps_to_solve") if baseline else None,
        },
    }
    checks = [
        report.check(
            "median_time_to_solve",
            median_s,
            "s",
            f"<= {GOAL_MEDIAN_S:g}",
            base_median,
            median_s is not None and median_s <= GOAL_MEDIAN_S,
        ),
        report.check(
            "seeds_solved",
            solved,
            "seeds",
            f"== {len(seeds)}",
            sum(1 for r in baseline if r.get("solved")) if baseline else None,
            solved == len(seeds),
        ),
    ]
    report.write(args.json, "e2e", figures, checks)
    return 0
