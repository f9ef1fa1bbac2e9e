"""What `canopy bench zoo` concludes from its runs: the checks of each env, one table per
env on stderr (and one of throughput and policy lag for canopy's systems), and the plot.

Checks: those of the system "canopy" (learner.algorithm "auto") against the strongest SB3
algorithm and, on CartPole-v1, SB3 PPO; for the on-policy systems (canopy-ppo,
canopy-impala; `onpolicy_checks`) the figures of the issue "On-policy learning at scale:
PPO and IMPALA", each beside its in-run baseline: SB3 PPO's time, env steps and return, and
for env steps/s the same actors stepping with random actions; for canopy-r2d2
(`r2d2_checks`) a confirmed solve on every seed where canopy-dqn, on a partially observed
env, stays below the threshold. A check is only there when its system ran.

Place: the second half of zoo.py, which runs every system and sums up each one's seeds
(`summarize`); what is here only reads those summaries and the `results` dict (zoo.py
`main`), so nothing here changes a figure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from canopy.cluster.bench import report
from canopy.config_defaults import ON_POLICY

CARTPOLE_STEPS_GOAL = 150_000  # median env steps to a confirmed CartPole solve


def strongest_sb3(systems: dict[str, dict[str, Any]]) -> tuple[str | None, float | None]:
    """The SB3 algorithm with the highest mean handed-over return (every seed scored)."""
    scored = [
        (s["handed_over_mean"], name)
        for name, s in systems.items()
        if name.startswith("sb3-") and s.get("handed_over_mean") is not None
    ]
    if not scored:
        return None, None
    mean, name = max(scored)
    return name, mean


def env_checks(
    env_id: str,
    threshold: float | None,
    systems: dict[str, dict[str, Any]],
    have_sb3: bool,
    *,
    action_space: str = "discrete",
    ceiling: float | None = None,
) -> list[dict[str, Any]]:
    """The checks of one env from its per-system summaries (those of each canopy system that
    ran); SB3-dependent ones fail without SB3. `ceiling`: the env's random-action env steps/s."""
    checks = canopy_checks(env_id, threshold, systems, have_sb3) if "canopy" in systems else []
    checks += sac_checks(env_id, threshold, systems, have_sb3) + r2d2_checks(env_id, threshold, systems)
    return checks + onpolicy_checks(env_id, threshold, systems, have_sb3, action_space, ceiling)


def sac_checks(
    env_id: str, threshold: float | None, systems: dict[str, dict[str, Any]], have_sb3: bool
) -> list[dict[str, Any]]:
    """canopy-sac on a Box env: a confirmed solve on every seed, a hand-over at least SB3 SAC's
    at the same budget, and sooner to a confirmed solve than canopy's TD3 (when it ran)."""
    sac = systems.get("canopy-sac")
    if sac is None:
        return []
    sb3_sac = systems.get("sb3-sac", {}) if have_sb3 else {}
    mean, base = sac["handed_over_mean"], sb3_sac.get("handed_over_mean")
    checks = [
        report.check(
            f"{env_id}: sac_vs_sb3_sac",
            mean,
            "return (100 episodes, mean over seeds)",
            ">= SB3 SAC's at the same budget",
            base,
            mean is not None and base is not None and mean >= base,
        )
    ]
    if threshold is not None:
        checks.append(
            report.check(
                f"{env_id}: sac_confirmed_solve_every_seed",
                _solve_figures(sac),
                "seeds solved; median s and env steps from process start to a confirmed solve",
                f"a confirmed solve (>= {threshold:g}) on each of {sac['seeds']} seeds",
                _solve_figures(sb3_sac) if sb3_sac else None,
                sac["seeds_solved"] == sac["seeds"],
            )
        )
    td3 = systems.get("canopy-td3")
    if td3 is not None and threshold is not None:
        t, base_t = sac["median_time_to_solve_s"], td3["median_time_to_solve_s"]
        checks.append(
            report.check(
                f"{env_id}: sac_median_time_to_solve_vs_td3",
                t,
                "s",
                "< canopy's TD3 in the same run (an unsolved TD3 counts as never)",
                base_t,
                t is not None and t < (math.inf if base_t is None else base_t),
            )
        )
    return checks


def r2d2_checks(
    env_id: str, threshold: float | None, systems: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """canopy-r2d2: a confirmed solve on every seed; beside canopy-dqn (when it ran), which
    sees one observation at a time and so, on a partially observed env
    (canopy/CartPoleNoVelocity-v1), should hand over a policy below the threshold."""
    r2d2 = systems.get("canopy-r2d2")
    if r2d2 is None or threshold is None:
        return []
    dqn = systems.get("canopy-dqn")
    checks = [
        report.check(
            f"{env_id}: r2d2_confirmed_solve_every_seed",
            _solve_figures(r2d2),
            "seeds solved; median s and env steps from process start to a confirmed solve",
            f"a confirmed solve (>= {threshold:g}) on each of {r2d2['seeds']} seeds",
            _solve_figures(dqn) if dqn else None,
            r2d2["seeds_solved"] == r2d2["seeds"],
        )
    ]
    if dqn is not None:
        mean = dqn["handed_over_mean"]
        checks.append(
            report.check(
                f"{env_id}: dqn_below_r2d2_without_memory",
                mean,
                "canopy-dqn's return (100 episodes, mean over seeds)",
                f"< {threshold:g}, where canopy-r2d2 solves",
                r2d2["handed_over_mean"],
                mean is not None and mean < threshold,
            )
        )
    return checks


def canopy_checks(
    env_id: str, threshold: float | None, systems: dict[str, dict[str, Any]], have_sb3: bool
) -> list[dict[str, Any]]:
    """The checks of the system "canopy" (learner.algorithm "auto") on one env."""
    ours = systems["canopy"]
    mean = ours["handed_over_mean"]
    best_name, best = strongest_sb3(systems) if have_sb3 else (None, None)
    both = threshold is not None and mean is not None and best is not None and min(mean, best) >= threshold
    goal = f">= the strongest SB3 algorithm's ({best_name or 'none'})"
    if threshold is not None:
        goal += f", or both >= {threshold:g}"
    checks = [
        report.check(
            f"{env_id}: canopy hand-over return vs strongest SB3 at equal budget",
            mean,
            "return (100 episodes, mean over seeds)",
            goal,
            best,
            mean is not None and best is not None and (mean >= best or both),
        )
    ]
    ppo = systems.get("sb3-ppo", {}) if have_sb3 else {}
    if env_id == "CartPole-v1" and threshold is not None:
        newest_min = ours.get("newest_min")
        checks.append(
            report.check(
                "CartPole-v1: newest version's 100-episode mean on every seed",
                newest_min,
                "return (min over seeds)",
                f">= {threshold:g} on every seed",
                ppo.get("handed_over_min"),
                newest_min is not None and newest_min >= threshold,
            )
        )
        steps = ours["median_env_steps_to_solve"]
        checks.append(
            report.check(
                "CartPole-v1: median env steps to a confirmed solve",
                steps,
                "env steps",
                f"<= {CARTPOLE_STEPS_GOAL}",
                ppo.get("median_env_steps_to_solve"),
                steps is not None and steps <= CARTPOLE_STEPS_GOAL,
            )
        )
        t, base = ours["median_time_to_solve_s"], ppo.get("median_time_to_solve_s")
        # SB3 PPO that never confirms a solve within the budget is beaten by any canopy solve.
        checks.append(
            report.check(
                "CartPole-v1: median time from process start to a confirmed solve vs SB3 PPO",
                t,
                "s",
                "< SB3 PPO's (training plus its evaluations)",
                base,
                bool(ppo) and t is not None and t < (math.inf if base is None else base),
            )
        )
    if env_id == "Pendulum-v1" and threshold is not None:
        solved = ours["seeds_solved"]
        sb3_solved = [s["seeds_solved"] for n, s in systems.items() if n.startswith("sb3-")]
        checks.append(
            report.check(
                f"Pendulum-v1: canopy confirmed >= {threshold:g} on every seed",
                solved,
                "seeds",
                f"== {ours['seeds']}",
                max(sb3_solved) if have_sb3 and sb3_solved else None,
                solved == ours["seeds"],
            )
        )
    return checks


def onpolicy_checks(
    env_id: str,
    threshold: float | None,
    systems: dict[str, dict[str, Any]],
    have_sb3: bool,
    action_space: str,
    ceiling: float | None,
) -> list[dict[str, Any]]:
    """The checks of canopy's on-policy systems (canopy-ppo, canopy-impala) that ran on one env."""
    sb3_ppo = systems.get("sb3-ppo", {}) if have_sb3 else {}
    checks: list[dict[str, Any]] = []
    ppo = systems.get("canopy-ppo")
    if ppo is not None and env_id == "CartPole-v1" and threshold is not None:
        checks += ppo_cartpole_checks(ppo, threshold, sb3_ppo)
    if ppo is not None and action_space == "box":
        mean, base = ppo["handed_over_mean"], sb3_ppo.get("handed_over_mean")
        checks.append(
            report.check(
                f"{env_id}: ppo_box_vs_sb3_ppo",
                mean,
                "return (100 episodes, mean over seeds)",
                ">= SB3 PPO's at the same budget",
                base,
                mean is not None and base is not None and mean >= base,
            )
        )
    impala = systems.get("canopy-impala")
    if impala is not None and action_space == "discrete" and threshold is not None:
        checks.append(
            report.check(
                f"{env_id}: impala_confirmed_solve_every_seed",
                _solve_figures(impala),
                "seeds solved; median s and env steps from process start to a confirmed solve",
                f"a confirmed solve (>= {threshold:g}) on each of {impala['seeds']} seeds",
                _solve_figures(sb3_ppo) if sb3_ppo else None,
                impala["seeds_solved"] == impala["seeds"],
            )
        )
    for algo in ON_POLICY:
        if f"canopy-{algo}" in systems:
            checks += lag_and_throughput_checks(env_id, algo, systems[f"canopy-{algo}"], ceiling)
    return checks


def _solve_figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("seeds_solved", "median_time_to_solve_s", "median_env_steps_to_solve")
    return {k: summary.get(k) for k in keys}


def ppo_cartpole_checks(
    ours: dict[str, Any], threshold: float, sb3_ppo: dict[str, Any]
) -> list[dict[str, Any]]:
    """canopy-ppo on CartPole-v1: a confirmed solve on every seed, sooner than SB3 PPO (time
    from process start, as the "canopy" check measures it), within 150,000 env steps."""
    solved, t, base = (
        ours["seeds_solved"],
        ours["median_time_to_solve_s"],
        sb3_ppo.get("median_time_to_solve_s"),
    )
    steps = ours["median_env_steps_to_solve"]
    return [
        report.check(
            "CartPole-v1: ppo_confirmed_solve_every_seed",
            solved,
            "seeds",
            f"== {ours['seeds']} (confirmed >= {threshold:g})",
            sb3_ppo.get("seeds_solved"),
            solved == ours["seeds"],
        ),
        # As for "canopy": SB3 PPO that never confirms a solve within the budget is beaten by
        # any canopy-ppo solve; no SB3 PPO run at all is no pass.
        report.check(
            "CartPole-v1: ppo_median_time_to_solve_vs_sb3_ppo",
            t,
            "s",
            "< SB3 PPO's (training plus its evaluations)",
            base,
            bool(sb3_ppo) and t is not None and t < (math.inf if base is None else base),
        ),
        report.check(
            "CartPole-v1: ppo_median_env_steps_to_solve",
            steps,
            "env steps",
            f"<= {CARTPOLE_STEPS_GOAL}",
            sb3_ppo.get("median_env_steps_to_solve"),
            steps is not None and steps <= CARTPOLE_STEPS_GOAL,
        ),
    ]


def lag_and_throughput_checks(
    env_id: str, algo: str, ours: dict[str, Any], ceiling: float | None
) -> list[dict[str, Any]]:
    """Reported figures (always met) of one on-policy system: its policy lag over seeds, and
    its env steps/s beside the same actors stepping with random actions."""
    lag = ours.get("policy_lag") or {}
    rate = ours.get("env_steps_per_s")
    return [
        report.check(
            f"{env_id}: {algo}_policy_lag",
            lag.get("median_p50"),
            "versions (median over seeds of each run's p50)",
            "report: versions between the acting policy and the learner's, over the items trained on",
            {"p90": lag.get("max_p90"), "max": lag.get("max_max")},
            True,
        ),
        report.check(
            f"{env_id}: {algo}_throughput_vs_random_actions",
            rate,
            "env steps/s of the whole canopy up (mean over seeds)",
            "report: the ceiling is the same actors (count, envs) stepping with random actions",
            ceiling,
            True,
        ),
    ]


def print_table(results: dict[str, Any]) -> None:
    """One table per env on stderr: each system's hand-over, newest version, env steps and solves."""
    from rich.console import Console
    from rich.table import Table

    def num(v: Any, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    # One table per env, short headers: a non-terminal stderr is 80 columns and rich would cut
    # figures, and headers too beside a system name as long as "canopy-impala": a log file
    # gets 100.
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = max(console.width, 100)
    for env_id, block in results["envs"].items():
        threshold = block["threshold"]
        table = Table(
            title=f"{env_id}: {results['budget_s']:g} s budget, {results['seeds']} seeds, "
            f"threshold {'-' if threshold is None else f'{threshold:g}'}"
        )
        for col in ("system", "mean", "min", "newest", "steps", "solved", "t solve", "to solve"):
            table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
        for name, system in block["systems"].items():
            s = system["summary"]
            table.add_row(
                name,
                num(s["handed_over_mean"]),
                num(s["handed_over_min"]),
                num(s.get("newest_mean")),
                num(s["env_steps_mean"], "{:,.0f}"),
                f"{s['seeds_solved']}/{s['seeds']}" if threshold is not None else "-",
                num(s["median_time_to_solve_s"], "{:.1f}s"),
                num(s["median_env_steps_to_solve"], "{:,.0f}"),
            )
        console.print(table)
        if throughput := throughput_table(env_id, block):
            console.print(throughput)
    console.print(
        "mean, min: the hand-over's 100-episode return over seeds; newest: canopy's newest version; "
        "steps: env steps used; t solve, to solve: median time and env steps to a confirmed solve; "
        "steps/s: env steps over wall time of the whole canopy up; ceiling: its actors with random "
        "actions; lag: policy versions behind the learner's (median p50, max p90, max max over seeds)"
    )


def throughput_table(env_id: str, block: dict[str, Any]) -> Any:
    """A rich Table of every canopy system's env steps/s against the ceiling and its policy
    lag; None where no system has those figures (a block of an older bench)."""
    from rich.table import Table

    rows = [(n, s["summary"]) for n, s in block["systems"].items() if "env_steps_per_s" in s["summary"]]
    if not rows:
        return None
    ceiling = block.get("random_actions_env_steps_per_s")
    table = Table(title=f"{env_id}: throughput and policy lag")
    for col in ("system", "steps/s", "ceiling", "lag p50", "lag p90", "lag max"):
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
    for name, s in rows:
        lag = s.get("policy_lag") or {}
        rates = (s["env_steps_per_s"], ceiling)
        lags = (lag.get("median_p50"), lag.get("max_p90"), lag.get("max_max"))
        cells = [
            *("-" if v is None else f"{v:,.0f}" for v in rates),
            *("-" if v is None else f"{v:g}" for v in lags),
        ]
        table.add_row(name, *cells)
    return table


def plot(results: dict[str, Any], out: str) -> Path:
    """Per env one row: return against wall clock (left) and env steps (right), every system and seed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    envs = list(results["envs"])
    fig, axes = plt.subplots(len(envs), 2, figsize=(13, 4 * len(envs)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (by_time, by_steps), env_id in zip(axes, envs, strict=True):
        block = results["envs"][env_id]
        for i, (name, system) in enumerate(block["systems"].items()):
            color = colors[i % len(colors)]
            for k, row in enumerate(system["seeds"]):
                label = name if k == 0 else None
                points = row.get("curve") or []
                confirms = row.get("confirms") or [p for p in points if p.get("confirm")]
                screens = [p for p in points if not p.get("confirm")]
                for ax, x in ((by_time, "wall_s"), (by_steps, "env_steps")):
                    xs = [p[x] for p in screens if p.get(x) is not None]
                    ys = [p["mean"] for p in screens if p.get(x) is not None]
                    ax.plot(xs, ys, color=color, alpha=0.7, linewidth=1, label=label)
                    cx = [p[x] for p in confirms if p.get(x) is not None]
                    cy = [p["mean"] for p in confirms if p.get(x) is not None]
                    ax.plot(cx, cy, "o", color=color, markersize=4)
        for ax, xlabel in ((by_time, "wall clock from process start (s)"), (by_steps, "env steps")):
            if block["threshold"] is not None:
                ax.axhline(block["threshold"], color="grey", linestyle=":", linewidth=1)
            ax.set(xlabel=xlabel, ylabel="return", title=f"{env_id}: return vs {xlabel.split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        by_time.axvline(results["budget_s"], color="grey", linestyle="--", linewidth=1)  # the budget
    fig.suptitle(
        "lines: 10-episode screens; dots: 100-episode confirmations; dotted: threshold; dashed: budget",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
