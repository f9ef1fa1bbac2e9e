"""Which systems `canopy bench zoo` runs on an env, and the figures only canopy's runs have.

Place: between zoo.py's arguments and its runs. `--algorithms` names canopy's systems (each a
`canopy up` with `learner.algorithm` set: "auto" is the system "canopy", any other name A is
"canopy-A"), `--sb3-algos` restricts SB3's; `fit_systems` keeps, per env, those that fit its
action space and says in the JSON why any other was skipped. `seed_figures` reads a run's
summary.json for its policy lag and env steps/s; `canopy_figures` sums them up over seeds.
"""

from __future__ import annotations

import statistics
from typing import Any

from canopy.cluster.bench.rlzoo import ALGOS
from canopy.config_defaults import ON_POLICY
from canopy.errors import UserError

# canopy's learner.algorithm values, and the action spaces each one takes ("auto" picks one
# that fits; the on-policy ones take both).
CANOPY_FITS: dict[str, tuple[str, ...]] = {
    "auto": ("discrete", "box"),
    "dqn": ("discrete",),
    "td3": ("box",),
    "sac": ("box",),
    "r2d2": ("discrete",),
    **{algo: ("discrete", "box") for algo in ON_POLICY},
}
SB3_ALGOS = tuple(dict.fromkeys(a for algos in ALGOS.values() for a in algos))
LAG_KEYS = ("p50", "p90", "p99", "max")


def _names(text: str, option: str, known: tuple[str, ...] | list[str]) -> list[str]:
    """A comma list of `known` names, in order, each once; a UserError for any other or none."""
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise UserError(f"{option} takes a comma list of {', '.join(known)} (got {text!r})")
    return names


def parse_algorithms(text: str) -> list[str]:
    """`--algorithms` as canopy learner.algorithm values, in order, each once."""
    return _names(text, "--algorithms", list(CANOPY_FITS))


def parse_sb3_algos(text: str) -> list[str] | None:
    """`--sb3-algos` as SB3 algorithm names; None (empty text): every one that fits."""
    return _names(text, "--sb3-algos", SB3_ALGOS) if text.strip() else None


def system_name(algorithm: str) -> str:
    """The results' name of canopy run with `algorithm`: "canopy" for "auto" (the name the
    checks of the default run have always had), "canopy-<algorithm>" otherwise."""
    return "canopy" if algorithm == "auto" else f"canopy-{algorithm}"


def is_canopy(system: str) -> bool:
    """Whether a system of the results is one of canopy's runs (not SB3's)."""
    return system == "canopy" or system.startswith("canopy-")


def with_algorithm(algorithm: str, sets: list[str]) -> list[str]:
    """The --set list of a canopy run: `learner.algorithm` first (a later --set of the user's
    still wins), nothing added for "auto", canopy's own default."""
    return list(sets) if algorithm == "auto" else [f'learner.algorithm="{algorithm}"', *sets]


def fit_systems(plan: dict[str, Any], algorithms: list[str], sb3_algos: list[str] | None) -> dict[str, Any]:
    """`plan` (zoo.plan_env's) with `canopy_systems` (system -> algorithm), SB3's `algos`
    narrowed to `sb3_algos`, and `skipped` (system -> why) for every one asked for that does
    not fit the env's action space."""
    kind, env_id = plan["action_space"], plan["env"]
    skipped: dict[str, str] = {}
    systems: dict[str, str] = {}
    for algo in algorithms:
        if kind in CANOPY_FITS[algo]:
            systems[system_name(algo)] = algo
        else:
            fits = " or ".join(CANOPY_FITS[algo])
            skipped[system_name(algo)] = f"{algo} takes {fits} actions; {env_id}'s are {kind}"
    algos = [a for a in plan["algos"] if sb3_algos is None or a in sb3_algos]
    for algo in [a for a in sb3_algos or [] if a not in plan["algos"]]:
        runs = ", ".join(plan["algos"])
        skipped[f"sb3-{algo}"] = f"SB3's {algo} is not run on {kind} actions (the zoo bench runs {runs})"
    return {**plan, "algos": algos, "canopy_systems": systems, "skipped": skipped}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def seed_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """One canopy run's policy lag (p50/p90/p99/max of summary.json, None where it has none)
    and env steps per second of the whole `canopy up` (its env_steps over its wall_s)."""
    steps, wall = _number(summary.get("env_steps")), _number(summary.get("wall_s"))
    return {
        "policy_lag": {k: _number(summary.get(f"policy_lag_{k}")) for k in LAG_KEYS},
        "env_steps_per_s": round(steps / wall, 1) if steps is not None and wall else None,
    }


def canopy_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the seeds of one canopy system: the median p50 policy lag, the highest p90 and
    max, and the mean env steps/s. Seeds without a figure (a crash, an older canopy) are
    left out; None where no seed has one."""
    lags = [r.get("policy_lag") or {} for r in rows]

    def over(key: str, how: Any) -> float | None:
        values = [v for lag in lags if (v := _number(lag.get(key))) is not None]
        return how(values) if values else None

    rates = [v for r in rows if (v := _number(r.get("env_steps_per_s"))) is not None]
    return {
        "policy_lag": {
            "median_p50": over("p50", statistics.median),
            "max_p90": over("p90", max),
            "max_max": over("max", max),
            "seeds": sum(_number(lag.get("p50")) is not None for lag in lags),
        },
        "env_steps_per_s": round(statistics.fmean(rates), 1) if rates else None,
    }
