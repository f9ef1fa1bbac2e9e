"""`canopy bench zoo`: canopy against SB3 with rl-zoo hyperparameters, at equal wall-clock budget.

For every env of --envs and every seed, one after another (never side by side: the bench
machine has two cores), it runs:

- canopy with its defaults: `canopy up --env E --seed S --time-limit B --run-dir DIR`, without
  --stop-at-return, so it trains the whole budget and hands over its best confirmed version
  (learner.algorithm "auto" fits the action space; a canopy older than that gets "td3" for
  Box spaces, its only algorithm for them). The hand-over is then scored with `canopy eval
  DIR --episodes 100` (its default version: the best confirmed; the newest where none was
  confirmed) and the newest version with `--version newest`, both on the same fresh seeds.
  The first confirmed evaluation (RUN_DIR/evals.jsonl, >= 100 episodes) at or above the
  threshold gives canopy's time and env steps to a confirmed solve;
- SB3, once per algorithm that fits the action space (PPO and DQN for Discrete; PPO, SAC and
  TD3 for Box), each in its own `python -m canopy.cluster.bench.sb3` process with the same budget: it
  screens as rl-zoo's EvalCallback does, hands over its best-screening model, confirms
  screens at the threshold over 100 episodes, and scores the hand-over over the same 100
  seeds as canopy's (see cluster/bench/sb3.py).

Clocks: every time to solve counts from the start of the system's process (interpreter start,
imports and evaluations included). canopy's own clock starts when its launcher does, so its
times are shifted by summary.json's `started_at` minus the moment the bench started the
process. The budget itself is canopy's --time-limit (launcher clock) and SB3's wall clock from
its process start; SB3's pays for its imports, canopy's does not (about two seconds).

Systems: --algorithms names canopy's runs (default "auto", the system "canopy"; "ppo" is the
system "canopy-ppo", and so on), each its own `canopy up` with `learner.algorithm` set;
--sb3-algos narrows SB3's (cluster/bench/zoo_systems.py). A system that does not fit an env's
action space is skipped, with the reason in the env's `skipped`. Every canopy system also
reports its policy lag and env steps/s (summary.json), beside the ceiling measured once per
env before the runs: the same actors stepping with random actions (cluster/bench/ceiling.py).

Thresholds: gymnasium's `spec.reward_threshold`, else DEFAULT_THRESHOLDS (Pendulum-v1: -200,
gymnasium gives none), both overridden by --threshold ENV=R.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from canopy.cluster.bench import ceiling, harness, report, zoo_systems
from canopy.cluster.bench.harness import read_jsonl
from canopy.cluster.bench.rlzoo import ALGOS, zoo_hyperparams
from canopy.cluster.bench.sb3 import CONFIRM_EPISODES
from canopy.cluster.bench.zoo_report import env_checks, plot, print_table
from canopy.errors import UserError

# Envs whose gymnasium spec has no reward_threshold; --threshold ENV=R overrides these.
DEFAULT_THRESHOLDS: dict[str, float] = {"Pendulum-v1": -200.0}
SB3_MISSING = (
    "canopy bench zoo: stable-baselines3 is not installed (pip install 'canopy-rl[bench]'); "
    "running canopy only, the SB3 checks are not met"
)
# After the budget, canopy up still stops its roles and evaluates; SB3 scores 100 episodes.
CANOPY_SLACK_S = 180.0
SB3_SLACK_S = 600.0
EVAL_TIMEOUT_S = 600.0


# ---- arguments -------------------------------------------------------------------------------
def parse_envs(text: str) -> list[str]:
    """`--envs` as env ids, in order, each once."""
    envs = [e.strip() for e in text.split(",") if e.strip()]
    if not envs:
        raise UserError("--envs names no env: pass a comma-separated list, e.g. CartPole-v1,Pendulum-v1")
    return list(dict.fromkeys(envs))  # a repeated id would only run twice


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """`--threshold ENV=R` items as {env id: threshold}."""
    out: dict[str, float] = {}
    for item in items:
        env, sep, value = item.partition("=")
        try:
            if not sep or not env.strip():
                raise ValueError
            out[env.strip()] = float(value)
        except ValueError:
            raise UserError(f"--threshold takes ENV=RETURN, e.g. Pendulum-v1=-200 (got {item!r})") from None
    return out


def score_seed(seed: int) -> int:
    """First reset seed of the 100 scoring episodes of `seed`: fresh, and apart from other seeds'."""
    return 10_000 + 1_000 * seed


def threshold_of(env_id: str, spec_threshold: float | None, overrides: dict[str, float]) -> tuple[Any, str]:
    """(solved threshold or None, where it came from)."""
    if env_id in overrides:
        return overrides[env_id], "--threshold"
    if spec_threshold is not None:
        return float(spec_threshold), "gymnasium spec.reward_threshold"
    if env_id in DEFAULT_THRESHOLDS:
        return DEFAULT_THRESHOLDS[env_id], "canopy bench zoo default (gymnasium has none)"
    return None, "none: gymnasium has no reward_threshold; pass --threshold ENV=R"


def plan_env(env_id: str, overrides: dict[str, float]) -> dict[str, Any]:
    """Action space kind, SB3 algorithms and threshold of one env; a UserError if it cannot run."""
    import gymnasium as gym

    from canopy import tasks

    tasks.register()  # canopy's own ids (canopy/CartPoleNoVelocity-v1) resolve here as in `canopy up`
    try:
        env = gym.make(env_id)
    except Exception as exc:  # gymnasium raises many types for a bad id or a missing extra
        raise UserError(f"--envs: cannot make {env_id!r}: {exc}") from None
    try:
        space = env.action_space
        spec_threshold = env.spec.reward_threshold if env.spec is not None else None
    finally:
        env.close()
    if isinstance(space, gym.spaces.Discrete):
        kind = "discrete"
    elif isinstance(space, gym.spaces.Box):
        kind = "box"
    else:
        raise UserError(f"{env_id} has action space {space}: the zoo bench takes Discrete or Box spaces")
    threshold, source = threshold_of(env_id, spec_threshold, overrides)
    return {
        "env": env_id,
        "action_space": kind,
        "algos": list(ALGOS[kind]),
        "threshold": threshold,
        "threshold_source": source,
    }


def sb3_available() -> bool:
    """Whether stable-baselines3 is installed."""
    return importlib.util.find_spec("stable_baselines3") is not None


# ---- canopy --------------------------------------------------------------------------------
def canopy_picks_algorithm() -> bool:
    """Whether canopy's default learner.algorithm ("auto") fits itself to the action space."""
    from canopy.config import LearnerConfig

    return LearnerConfig().algorithm == "auto"


def first_solve(evals: list[dict[str, Any]] | None, threshold: float | None) -> dict[str, Any] | None:
    """The first confirmed evaluation (>= 100 episodes) at or above the threshold."""
    if not evals or threshold is None:
        return None
    for row in evals:
        if (
            row.get("episodes", CONFIRM_EPISODES) >= CONFIRM_EPISODES
            and row.get("mean", -math.inf) >= threshold
        ):
            return row
    return None


def canopy_eval(run_dir: Path, seed: int, version: str | None) -> dict[str, Any]:
    """`canopy eval RUN_DIR --episodes 100` (optionally `--version V`): its JSON, or why not."""
    cmd = harness.canopy("eval", str(run_dir), "--episodes", str(CONFIRM_EPISODES))
    cmd += ["--seed", str(score_seed(seed)), *(["--version", version] if version else [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=EVAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"canopy eval took over {EVAL_TIMEOUT_S:g} s"}
    if done.returncode != 0:
        if version and "unrecognized arguments" in done.stderr and "--version" in done.stderr:
            return {"unsupported": True}
        return {"error": done.stderr.strip().splitlines()[-1:]}
    try:
        return {**json.loads(done.stdout.strip().splitlines()[-1]), "seed": score_seed(seed)}
    except (ValueError, IndexError):
        return {"error": f"canopy eval printed no JSON: {done.stdout[-200:]!r}"}


def run_canopy(
    plan: dict[str, Any],
    seed: int,
    budget_s: float,
    sets: list[str],
    run_dir: Path,
    on_progress: Callable[[str], None],
) -> dict[str, Any]:
    """One `canopy up` for the budget, then its hand-over and newest version scored over 100 episodes."""
    if plan["action_space"] == "box" and not canopy_picks_algorithm():
        sets = ['learner.algorithm="td3"', *sets]  # an older default (dqn) refuses Box actions
    cmd = harness.up_command(plan["env"], run_dir, seed=seed, time_limit=budget_s, sets=sets)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    stderr_path = run_dir.with_suffix(".stderr")
    started = time.time()
    row: dict[str, Any] = {"seed": seed, "run_dir": str(run_dir), "notes": []}
    try:
        with open(stderr_path, "wb") as stderr:
            code = harness.watch(
                cmd,
                subprocess.DEVNULL,
                stderr,
                budget_s + CANOPY_SLACK_S,
                lambda: on_progress(harness.latest_row(run_dir)),
            )
    except subprocess.TimeoutExpired:
        code, row["error"] = -1, [f"canopy up ran past the budget + {CANOPY_SLACK_S:g} s: killed"]
    if code != 0:
        row.setdefault("error", harness.last_lines(stderr_path))
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    row.update(run_figures(run_dir, summary, started, plan["threshold"], row["notes"]))
    if summary:
        score_handover(row, run_dir, seed)
    return row


def run_figures(
    run_dir: Path, summary: dict[str, Any], started: float, threshold: float | None, notes: list[str]
) -> dict[str, Any]:
    """What one canopy run's records say: steps, the first confirmed solve and its curves,
    on the bench's clock (from the process start)."""
    # canopy's clock starts with its launcher; the bench's with the process.
    offset = summary["started_at"] - started if isinstance(summary.get("started_at"), int | float) else 0.0
    metrics = read_jsonl(run_dir / "metrics.jsonl") or []
    evals = read_jsonl(run_dir / "evals.jsonl")
    if evals is None:
        notes.append("no evals.jsonl (a canopy without it): no confirmed evaluations, no solve")
    solve = first_solve(evals, threshold)
    return {
        "startup_offset_s": round(offset, 3),
        "wall_s": summary.get("wall_s"),
        "stop_reason": summary.get("stop_reason"),
        "env_steps": summary.get("env_steps") or (metrics[-1].get("env_steps") if metrics else None),
        "solved": solve is not None,
        "time_to_solve_s": round(solve["wall_s"] + offset, 2) if solve else None,
        "env_steps_to_solve": solve.get("env_steps") if solve else None,
        "solve_version": solve.get("version") if solve else None,
        **zoo_systems.seed_figures(summary),
        "curve": [
            {
                "wall_s": round(r["wall_s"] + offset, 2),
                "env_steps": r.get("env_steps"),
                "mean": r["eval_return"],
            }
            for r in metrics
            if isinstance(r.get("wall_s"), int | float) and isinstance(r.get("eval_return"), int | float)
        ],
        "confirms": [
            {"wall_s": round(r["wall_s"] + offset, 2), "env_steps": r.get("env_steps"), "mean": r["mean"]}
            for r in evals or []
            if isinstance(r.get("wall_s"), int | float) and isinstance(r.get("mean"), int | float)
        ],
    }


def score_handover(row: dict[str, Any], run_dir: Path, seed: int) -> None:
    """`score` (the hand-over) and `newest` of a finished run, each over 100 fresh episodes."""
    row["score"] = canopy_eval(run_dir, seed, None)
    newest = canopy_eval(run_dir, seed, "newest")
    if newest.get("unsupported"):
        # Before `canopy eval --version`, its one version was the newest: the same score is both.
        row["notes"].append("canopy eval has no --version: its default (the newest) scored as both")
        newest = row["score"]
    elif "error" in row["score"] and "error" not in newest:
        # No version confirmed within the budget: like SB3 with no screen yet, the newest is
        # what the run has to hand over.
        row["notes"].append(f"no best confirmed version ({row['score']['error']}): the newest is handed over")
        row["score"] = newest
    row["newest"] = newest


# ---- Stable-Baselines3 ---------------------------------------------------------------------
def run_sb3(
    plan: dict[str, Any],
    algo: str,
    seed: int,
    budget_s: float,
    threads: int,
    out: Path,
    on_tick: Callable[[], None],
) -> dict[str, Any]:
    """One `python -m canopy.cluster.bench.sb3` run: its JSON, or the error it died of."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = out.with_suffix(".json"), out.with_suffix(".stderr")
    cmd = [sys.executable, "-m", "canopy.cluster.bench.sb3", "--env", plan["env"], "--algo", algo]
    cmd += ["--seed", str(seed), "--budget-s", str(budget_s), "--score-seed", str(score_seed(seed))]
    cmd += ["--threads", str(threads)]
    if plan["threshold"] is not None:
        cmd += ["--threshold", str(plan["threshold"])]
    try:
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            cmd += ["--started-at", repr(time.time())]  # its clock: from here, imports included
            code = harness.watch(cmd, stdout, stderr, budget_s + SB3_SLACK_S, on_tick)
    except subprocess.TimeoutExpired:
        return {"seed": seed, "error": [f"SB3 ran past the budget + {SB3_SLACK_S:g} s: killed"]}
    if code != 0:
        return {"seed": seed, "error": harness.last_lines(stderr_path)}
    try:
        return json.loads(stdout_path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {"seed": seed, "error": ["no JSON on stdout"]}


# ---- figures -------------------------------------------------------------------------------
def median_or_none(values: list[Any]) -> float | None:
    """Median over seeds, an unsolved seed (None) counting as never: None unless most seeds solved."""
    if not values:
        return None
    m = statistics.median([math.inf if v is None else float(v) for v in values])
    return None if math.isinf(m) else m


def _score(row: dict[str, Any], key: str = "score") -> float | None:
    value = (row.get(key) or {}).get("mean_return")
    return float(value) if isinstance(value, int | float) else None


def summarize(rows: list[dict[str, Any]], seeds: int, newest: bool = False) -> dict[str, Any]:
    """One system on one env, over seeds. A mean or min needs every seed scored (a crash is no pass)."""
    scores = [_score(r) for r in rows]
    complete = len(rows) == seeds and all(s is not None for s in scores)
    steps = [r["env_steps"] for r in rows if isinstance(r.get("env_steps"), int | float)]
    out: dict[str, Any] = {
        "seeds": seeds,
        "seeds_scored": sum(s is not None for s in scores),
        "handed_over_mean": round(statistics.fmean(scores), 3) if complete else None,
        "handed_over_min": min(scores) if complete else None,
        "env_steps_mean": round(statistics.fmean(steps)) if steps else None,
        "seeds_solved": sum(bool(r.get("solved")) for r in rows),
        "median_time_to_solve_s": median_or_none([r.get("time_to_solve_s") for r in rows]),
        "median_env_steps_to_solve": median_or_none([r.get("env_steps_to_solve") for r in rows]),
    }
    if newest:
        values = [_score(r, "newest") for r in rows]
        done = len(rows) == seeds and all(v is not None for v in values)
        out["newest_mean"] = round(statistics.fmean(values), 3) if done else None
        out["newest_min"] = min(values) if done else None
    return out


# ---- main ----------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """Every env and seed on every system, the tables, the plot with `--plot`; the report goes to `--json`."""
    envs = parse_envs(args.envs)
    overrides = parse_thresholds(args.threshold)
    algorithms = zoo_systems.parse_algorithms(args.algorithms)
    sb3_algos = zoo_systems.parse_sb3_algos(args.sb3_algos)
    if args.seeds < 1 or args.budget_s <= 0 or args.ceiling_s < 0:
        raise UserError("--seeds must be >= 1, --budget-s > 0 and --ceiling-s >= 0")
    plans = [zoo_systems.fit_systems(plan_env(e, overrides), algorithms, sb3_algos) for e in envs]
    installed = sb3_available()
    have_sb3 = installed and not args.skip_sb3
    if not installed and not args.skip_sb3:
        print(SB3_MISSING, file=sys.stderr)
    work = Path(args.work_dir or Path("runs") / f"zoo-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    for plan in plans:  # before any run, so nothing else of the bench's competes for the CPU
        plan.update(measure_ceiling(plan["env"], args.set, args.ceiling_s))
    runs = run_all(args, plans, have_sb3, work)
    results: dict[str, Any] = {
        "budget_s": args.budget_s,
        "seeds": args.seeds,
        "work_dir": str(work),
        "clock": "times from each system's process start; canopy's launcher times shifted by its start-up",
        "sb3": {
            "installed": installed,
            "ran": have_sb3,
            "torch_threads": args.sb3_threads,
            **({"message": SB3_MISSING} if not installed else {}),
        },
        "envs": {},
    }
    checks: list[dict[str, Any]] = []
    for plan in plans:
        block, checks_of_env = env_results(plan, runs[plan["env"]], args.seeds, have_sb3)
        results["envs"][plan["env"]] = block
        checks += checks_of_env
    print_table(results)
    if args.plot:
        results["plot"] = str(plot(results, args.plot))
    report.write(args.json, "zoo", results, checks)
    return 0


def measure_ceiling(env_id: str, sets: list[str], seconds: float) -> dict[str, Any]:
    """The env block's `random_actions_env_steps_per_s` (the throughput ceiling, None when
    `seconds` is 0 or it failed) and `random_actions` (how it was measured, or why not)."""
    if seconds <= 0:
        return {"random_actions_env_steps_per_s": None, "random_actions": {"skipped": "--ceiling-s 0"}}
    try:
        how = ceiling.random_actions_rate(env_id, sets, seconds)
    except Exception as exc:  # a reported baseline: its failure is told, the runs still go on
        return {"random_actions_env_steps_per_s": None, "random_actions": {"error": str(exc)}}
    return {"random_actions_env_steps_per_s": how["env_steps_per_s"], "random_actions": how}


def run_all(
    args: argparse.Namespace, plans: list[dict[str, Any]], have_sb3: bool, work: Path
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every env, seed and system one after another: env -> system -> one row per seed."""
    seeds = list(range(args.seeds))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {p["env"]: {} for p in plans}
    per_seed = {p["env"]: len(p["canopy_systems"]) + (len(p["algos"]) if have_sb3 else 0) for p in plans}
    with harness.progress() as bar:
        task = bar.add_task("zoo", total=sum(per_seed.values()) * len(seeds))
        for plan in plans:
            env_id = plan["env"]
            for seed in seeds:

                def show(text: str, name: str, seed: int = seed, env_id: str = env_id) -> None:
                    bar.update(task, description=f"{env_id} seed {seed} {name}: {text}")

                for name, algorithm in plan["canopy_systems"].items():

                    def progress(text: str, name: str = name) -> None:
                        show(text, name)

                    progress("starting")
                    run_dir = work / env_id / f"{name}-seed-{seed}"
                    sets = zoo_systems.with_algorithm(algorithm, args.set)
                    row = run_canopy(plan, seed, args.budget_s, sets, run_dir, progress)
                    runs[env_id].setdefault(name, []).append(row)
                    bar.advance(task)
                for algo in plan["algos"] if have_sb3 else []:
                    t0 = time.monotonic()

                    def tick(name: str = f"sb3-{algo}", t0: float = t0) -> None:
                        show(f"{time.monotonic() - t0:.0f}s", name)

                    tick()
                    out = work / env_id / f"sb3-{algo}-seed-{seed}"
                    result = run_sb3(plan, algo, seed, args.budget_s, args.sb3_threads, out, tick)
                    runs[env_id].setdefault(f"sb3-{algo}", []).append(result)
                    bar.advance(task)
    return runs


def env_results(
    plan: dict[str, Any], runs: dict[str, list[dict[str, Any]]], seeds: int, have_sb3: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One env's block of the JSON (its plan, the zoo's hyperparameters, every system's
    summary and rows) and its checks."""
    env_id = plan["env"]
    systems = {}
    for name, rows in runs.items():
        summary = summarize(rows, seeds, newest=zoo_systems.is_canopy(name))
        if zoo_systems.is_canopy(name):
            summary.update(zoo_systems.canopy_figures(rows))
        systems[name] = {"summary": summary, "seeds": rows}
    if not have_sb3:  # absent, not zero: the table and JSON show SB3 did not run
        systems.update({f"sb3-{a}": {"summary": summarize([], seeds), "seeds": []} for a in plan["algos"]})
    summaries = {name: s["summary"] for name, s in systems.items()}
    block = {
        **plan,
        "sb3_hyperparameters": {
            a: dict(zip(("params", "source"), zoo_hyperparams(a, env_id), strict=True)) for a in plan["algos"]
        },
        "systems": systems,
    }
    checks = env_checks(
        env_id,
        plan["threshold"],
        summaries,
        have_sb3,
        action_space=plan["action_space"],
        ceiling=plan.get("random_actions_env_steps_per_s"),
    )
    return block, checks
