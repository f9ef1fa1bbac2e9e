"""The report of a `canopy up` run once it stops: the handover, replay snapshots, summary.json.

Place in the data flow: the launcher (cluster/launcher.py) stops the actors, the learner
and the evaluator, then asks this module to score the newest and the best confirmed
version on fresh episodes (the best saved as RUN_DIR/best.safetensors), to have every
replay shard write a final snapshot, and to sum it all up with the solve and the last
metrics row from the monitor (cluster/monitor.py) into summary.json. `write_json` also
writes cluster.json, the supervisor's (cluster/supervisor.py) map of the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import redis
import zmq

from canopy import curve, wire
from canopy.cluster import redis_server
from canopy.cluster.supervisor import Child
from canopy.config import Config
from canopy.errors import DeadlineExceeded, ProtocolError, UserError
from canopy.keys import Keys

SNAPSHOT_TIMEOUT_S = 60.0  # the final replay snapshot of a clean stop
FINAL_EVAL_SEED = 2 * 10**9  # the hand-over's scoring seeds: none of the evaluator's or actors'


class Report:
    """The figures summary.json holds about one run.

    Example:
        report = Report(cfg, r, Keys(cfg.run.name), resumed=False, t0=t0, started_at=started_at)
        final = report.handover()
        summary = report.summary(solve, "solved", final, learner_stats, last_row, snapshots)
    """

    def __init__(
        self, cfg: Config, r: redis.Redis, keys: Keys, resumed: bool, t0: float, started_at: float
    ) -> None:
        self.cfg = cfg
        self.r = r
        self.keys = keys
        self.resumed = resumed
        self.t0 = t0
        self.started_at = started_at

    def handover(self) -> dict[str, Any]:
        """Score the newest and the best confirmed version on fresh episodes; save the best.

        Both over `eval.confirm_episodes` episodes on seeds no evaluation used, so summary.json
        says what a user gets, not what the evaluator saw; the best goes to RUN_DIR/best.safetensors.
        """
        from canopy.actors.evaluator import judge
        from canopy.actors.policy import population_arrays
        from canopy.cluster.export import handover, write_policy

        run_dir = Path(self.cfg.run.dir)
        n, seed = self.cfg.eval.confirm_episodes, FINAL_EVAL_SEED + self.cfg.run.seed * 10_000
        figures = ("version", "model", "return_mean", "return_std", "return_min", "episodes")
        out: dict[str, Any] = {f"{which}_{k}": None for which in ("newest", "best") for k in figures}
        for which in ("newest", "best"):
            try:
                taken = handover(self.r, self.keys, which)
            except (UserError, ProtocolError) as exc:
                out[f"{which}_error"] = str(exc)
                continue
            models = population_arrays(taken.arrays)
            if which == "newest":  # a population's newest version is worth its best model
                scores = [judge(taken.manifest.arch, m, self.cfg.env, n, seed) for m in models]
                model = max(range(len(scores)), key=lambda i: scores[i]["mean"])
                score = scores[model]
            else:
                model = taken.model
                score = judge(taken.manifest.arch, models[model], self.cfg.env, n, seed)
                out["best_confirmed_return"] = float(taken.record.get("mean", "nan"))
                with contextlib.suppress(ProtocolError):  # a non-mlp policy: eval, not export
                    write_policy(taken, self.cfg.env, run_dir / "best.safetensors", model=model)
                    out["best_file"] = str(run_dir / "best.safetensors")
            out |= {
                f"{which}_version": str(taken.manifest.version),
                f"{which}_model": model,
                f"{which}_return_mean": score["mean"],
                f"{which}_return_std": score["std"],
                f"{which}_return_min": score["min"],
                f"{which}_episodes": score["episodes"],
            }
        return out

    def summary(
        self,
        solve: dict[str, Any],
        stop_reason: str,
        final: dict[str, Any],
        learner: dict[str, str],
        last: dict[str, Any],
        replay_snapshots: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """summary.json's content: `solve` from the verdicts ({} when unsolved), `final` from
        `handover`, `learner` the active learner's stats hash, `last` the last metrics row."""
        import gymnasium
        import torch

        return {
            "run": self.cfg.run.name,
            "env_id": self.cfg.env.id,
            "seed": self.cfg.run.seed,
            "stop_at_return": self.cfg.run.stop_at_return,
            "solved": bool(solve),
            "stop_reason": stop_reason,
            "resumed": self.resumed,
            "time_to_solve_s": solve.get("time_to_solve_s"),
            "env_steps_to_solve": solve.get("env_steps_to_solve"),
            "solve_version": solve.get("solve_version"),
            "solve_eval_return": solve.get("solve_eval_return"),
            "solve_eval_std": solve.get("solve_eval_std"),
            **final,
            # The newest version's score, under the name runs before best-version pinning used.
            "final_eval_return": final.get("newest_return_mean"),
            "versions_published": int(learner.get("versions_published_total", 0)),
            "updates": int(learner.get("updates_total", 0)),
            "env_steps": last.get("env_steps"),
            "epoch": int(learner.get("epoch", 0)),
            # Versions between the one that acted and the learner's, over every item trained on
            # (learner/role.py; None before the learner reported any).
            "policy_lag_p50": _float_or_none(learner.get("policy_lag_p50")),
            "policy_lag_p90": _float_or_none(learner.get("policy_lag_p90")),
            "policy_lag_p99": _float_or_none(learner.get("policy_lag_p99")),
            "policy_lag_max": _float_or_none(learner.get("policy_lag_max")),
            "replay_snapshots": replay_snapshots,
            "wall_s": round(time.monotonic() - self.t0, 3),
            "started_at": self.started_at,
            "versions": {
                "canopy": _canopy_version(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "gymnasium": gymnasium.__version__,
                "redis_server": redis_server.version(),
            },
            "machine": machine_facts(),
        }


def snapshot_replay(shards: list[Child]) -> list[dict[str, Any]]:
    """Ask every replay shard for a snapshot now (actors and learner stopped: nothing moves).

    Each entry is the shard's reply header (or `error`), kept in summary.json so a
    resumed run can be checked against what was saved.
    """
    out = []
    for ch in shards:
        if ch.proc.poll() is not None:
            out.append({"id": ch.ident, "error": f"not running (exit code {ch.proc.returncode})"})
            continue
        try:
            reply = replay_request(ch.endpoints["replay"], {"op": "snapshot"}, SNAPSHOT_TIMEOUT_S)
        except (DeadlineExceeded, ProtocolError) as exc:
            reply = {"error": str(exc)}
        out.append({"id": ch.ident, **reply})
    return out


def replay_request(endpoint: str, header: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to a replay shard; its reply header (`error` for an error reply)."""
    from canopy.replay import protocol

    request = protocol.one_off(header)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    curve.connect(sock, endpoint, curve.REPLAY_SERVER)
    try:
        sock.send_multipart(wire.encode(request))
        if not sock.poll(int(timeout * 1000)):
            raise DeadlineExceeded(f"replay shard {endpoint} did not answer {header['op']} in {timeout:.0f}s")
        msg = wire.decode(sock.recv_multipart(), protocol.REPLY_MAX_FRAME)
    finally:
        sock.close(0)
    if protocol.error_code(msg.header) is not None:
        return {"error": protocol.error_message(protocol.reply_fields(msg.header))}
    return protocol.reply_fields(msg.header)


def machine_facts() -> dict[str, Any]:
    """CPUs, memory, platform and processor of this machine, for summary.json."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "processor": platform.machine(),
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` through a temporary file: a reader never sees half a document."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _canopy_version() -> str:
    from canopy import __version__

    return __version__


def _float_or_none(value: str | None) -> float | None:
    return None if value is None else float(value)
