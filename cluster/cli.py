"""The `canopy` command: one table of subcommands, user errors printed as one line.

canopy up [--env ID] [--set k=v ...]          the embedded local cluster
canopy up --resume RUN_DIR                    continue a stopped run where it left off
canopy up --resume --redis H:P --password-file F   a deployment's run, here, from its newest checkpoint
canopy up --ray ADDRESS [--env ID] ...        the same roles on the nodes of a Ray cluster
canopy redis|replay|cache|learner|actor|evaluator --config FILE --id N
canopy bench e2e --env ID --seeds N --json FILE
canopy bench broadcast --actors N --model-mb M --json FILE
canopy bench checkpoint --state-mb 128 --json FILE
canopy bench learner --json FILE
canopy bench actors --json FILE
canopy bench soak --actors 1000 --minutes 10 --json FILE
canopy bench faults [--faults a,b,c] --json FILE
canopy cache plan --hosts H --actors N --model-mb M   fan-out and depth of the cache tree
canopy checkpoint plan [--config FILE]          where checkpoint chunks go
canopy checkpoint list RUN|CONNECTION           a run's committed checkpoints
canopy keys DIR                                 CURVE keys for ZeroMQ across hosts
canopy tls DIR [--name HOST ...]                CA and certificate for Redis over TLS (DIR/tls)
canopy check-env ID [--set env.kwargs=...]      gymnasium checks, spaces, stepping speed
canopy export RUN|CONNECTION --out FILE [--format F] [--version best|newest|ID]   the policy as a file
canopy eval RUN|CONNECTION|FILE [--episodes 100] [--version best|newest|ID] [--video F.gif]
canopy status|plot RUN|CONNECTION               roles table; learning curves PNG
RUN is a `canopy up` run directory; CONNECTION is --config cluster.toml or
--redis HOST:PORT --password-file F [--user status] (cluster/connection.py).
canopy hosts plan CONFIG [--place ROLE=HOST]    role commands per host (bare metal)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from canopy import config as config_mod
from canopy.cluster import bench_cli, connection
from canopy.errors import CanopyError, ConfigError, DeadlineExceeded, UserError

# role name -> module whose `run(cfg, ident, stop)` runs it
VERSION_HELP = "best (the best version the evaluator confirmed; default), newest, or a version id"
RUN_DIR_HELP = "a run directory of canopy up (or pass the connection options)"
MODEL_HELP = "which model of a population run (default: the confirmed one of `best`, else 0)"
ROLES = {
    "replay": "canopy.replay.role",
    "cache": "canopy.cache.role",
    "learner": "canopy.learner.role",
    "actor": "canopy.actors.actor",
    "evaluator": "canopy.actors.evaluator",
}


def _role_command(args: argparse.Namespace) -> int:
    from canopy import curve, lifecycle

    lifecycle.watch_parent()
    if args.config is None:  # optional only so that `canopy cache plan` parses
        raise UserError(f"canopy {args.role} needs --config FILE (a run's config.toml)")
    device = getattr(args, "device", None)  # `canopy learner --device`: learner.device, said shortly
    overrides = [*args.set, *([f"learner.device={json.dumps(device)}"] if device else [])]
    cfg = config_mod.load(args.config, overrides)
    if args.role == "redis":
        from canopy.cluster.redis_server import exec_server

        exec_server(cfg, args.id)
        return 0  # not reached: exec replaced this process
    curve.use(curve.load(cfg.cluster, args.role))  # every ZeroMQ socket of this role follows it
    stop = lifecycle.stop_event()
    # A standby learner waits cold first, without torch (learner/standby.py).
    module = "canopy.learner.standby" if getattr(args, "standby", False) else ROLES[args.role]
    importlib.import_module(module).run(cfg, args.id, stop)
    return 0


def _up(args: argparse.Namespace) -> int:
    from canopy.cluster.launcher import adopt, up

    overrides = list(args.set)
    config_path = args.config
    if args.ray is not None and args.resume is not None:
        raise UserError("--ray starts a new run: drop --ray or --resume")
    adopted = None
    if args.resume == "":  # a deployment's run, named by the connection options
        clash = [f for f, v in (("--env", args.env), ("--seed", args.seed)) if v is not None]
        if clash:
            raise UserError(
                f"--resume takes the run's own config: drop {', '.join(clash)} (--set still works)"
            )
    elif args.resume is not None:
        if connection.given(args) and not args.config:
            raise UserError("--resume RUN_DIR takes no connection options: the run directory names the run")
        config_path = Path(args.resume) / "config.toml"
        if not config_path.is_file():
            raise UserError(
                f"cannot resume {args.resume}: no config.toml there (not a canopy up run directory)"
            )
        # The run's own resolved config: same run name, same keys, same directories. Flags
        # that repeat it are fine (scripts/up.sh always passes --env), others are refused.
        saved = config_mod.load(config_path)
        clash = [
            flag
            for flag, given, kept in (
                ("--config", args.config, None),
                ("--run-dir", args.run_dir, None),
                ("--env", args.env, saved.env.id),
                ("--seed", args.seed, saved.run.seed),
            )
            if given is not None and given != kept
        ]
        if clash:
            raise UserError(
                f"--resume takes the run's own config: drop {', '.join(clash)} (--set still works)"
            )
        args.run_dir = str(Path(args.resume).resolve())
    elif connection.given(args) and not args.config:
        raise UserError("the connection options go with --resume (a deployment's run, continued here)")
    for flag, key in (
        ("env", "env.id"),
        ("seed", "run.seed"),
        ("stop_at_return", "run.stop_at_return"),
        ("time_limit", "run.time_limit_s"),
        ("run_dir", "run.dir"),
        ("device", "learner.device"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.resume == "":
        cfg, adopted = adopt(connection.resolve(args), overrides)
    else:
        cfg = config_mod.load(config_path, overrides)
    if args.ray is not None:
        from canopy.cluster import ray_launch  # imports Ray only when asked for

        summary = ray_launch.up(cfg, args.ray)
    else:
        summary = up(cfg, resume=bool(args.resume), adopted=adopted)
    keys = (
        "solved",
        "time_to_solve_s",
        "env_steps_to_solve",
        "best_version",
        "best_return_mean",
        "newest_version",
        "newest_return_mean",
        "versions_published",
        "wall_s",
    )
    print(json.dumps({k: summary[k] for k in keys}))
    return 0


def _status(args: argparse.Namespace) -> int:
    from canopy.cluster import status

    return status.main(connection.resolve(args, args.run_dir), args.watch)


def _health(args: argparse.Namespace) -> int:
    from canopy.cluster import status

    return status.health(args.config, args.role, args.id, args.allow_standby)


def _plot(args: argparse.Namespace) -> int:
    from canopy.cluster.plot import plot

    live = connection.resolve(args) if connection.given(args) else None
    if live is None and not args.run_dirs:
        raise UserError(f"which run? pass {connection.SOURCES_HELP}")
    print(plot(args.run_dirs, args.out, live))
    return 0


def _hosts_plan(args: argparse.Namespace) -> int:
    from canopy.cluster import hostplan

    cfg = config_mod.load(args.config)
    hosts = hostplan.plan(cfg, args.config, hostplan.parse_placement(args.place))
    print(hostplan.render(hosts, args.json))
    return 0


def _export(args: argparse.Namespace) -> int:
    from canopy.cluster.export import export

    target = connection.resolve(args, args.run_dir)
    print(f"wrote {export(target, args.out, args.format, args.version, args.model)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from canopy.cluster.export import evaluate

    if args.episodes < 1:
        raise UserError("--episodes must be at least 1")
    is_file = args.source is not None and Path(args.source).is_file()
    if is_file and connection.given(args):
        raise UserError("pass an exported FILE or a run, not both")
    source = args.source if is_file else connection.resolve(args, args.source)
    result = evaluate(source, args.episodes, args.seed, args.env, args.video, args.model, args.version)
    print(json.dumps(result))
    return 0


def _check_env(args: argparse.Namespace) -> int:
    from canopy.actors import check_env

    env = config_mod.load(None, [f"env.id={json.dumps(args.env_id)}", *args.set]).env
    return check_env.main(args.env_id, env)


def _keys(args: argparse.Namespace) -> int:
    from canopy import curve

    d = curve.generate(args.dir)
    print(
        f"CURVE keys in {d}: set cluster.curve_dir = {str(d)!r}; give each role's hosts only its own"
        " *.key_secret (docs/security.md)"
    )
    return 0


def _tls(args: argparse.Namespace) -> int:
    from canopy import tls

    return tls.command(Path(args.dir), args.name)


def _cache_plan(args: argparse.Namespace) -> int:
    from canopy.cache import topology

    try:
        plan = topology.plan(topology.from_cli(args))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(plan.to_dict()) if args.json else plan.describe())
    return 0


def _checkpoint_list(args: argparse.Namespace) -> int:
    from rich.console import Console

    from canopy.cluster.status import checkpoints

    table = checkpoints(connection.resolve(args, args.run_dir))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def _checkpoint_plan(args: argparse.Namespace) -> int:
    from canopy.learner.checkpoint.placement import make_plan, shard_hosts_of

    cfg = config_mod.load(args.config, args.set)
    ck = cfg.checkpoint
    addresses = cfg.cluster.redis or [f"shard{i}" for i in range(cfg.redis.shards)]
    try:
        hosts = shard_hosts_of(ck.shard_hosts, addresses)
        plan = make_plan(hosts, ck.replicas, ck.learner_host, args.learner, ck.placement)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(plan.describe(args.chunks))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `canopy` argument parser: every subcommand, each with its handler as `func`."""
    parser = argparse.ArgumentParser(prog="canopy", description="distributed reinforcement learning")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_up(sub)
    _add_roles(sub)
    _add_cluster_commands(sub)
    _add_tools(sub)
    bench_cli.add(sub)
    return parser


def _add_up(sub: argparse._SubParsersAction) -> None:
    """`canopy up`: the embedded local cluster."""
    up = sub.add_parser("up", help="run a whole cluster on this machine")
    up.add_argument("--config", help="TOML config file (defaults apply to anything not set)")
    up.add_argument("--env", help="gymnasium env id, e.g. CartPole-v1")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    up.add_argument("--stop-at-return", type=float, help="stop once a greedy evaluation reaches this")
    up.add_argument("--time-limit", type=float, help="stop after this many seconds")
    up.add_argument("--run-dir", help="where cluster.json, summary.json and logs go")
    up.add_argument("--seed", type=int)
    up.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the learner trains")
    up.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_DIR",
        help="continue a stopped run: its config, checkpoints and replay; without RUN_DIR, the run "
        "--redis/--password-file (or --config) name, from its newest checkpoint",
    )
    up.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run every role on the nodes of the Ray cluster at ADDRESS (host:port, or auto); "
        "needs pip install 'canopy-rl[ray]'",
    )
    connection.add_options(up, config=False)
    up.set_defaults(func=_up)


def _add_roles(sub: argparse._SubParsersAction) -> None:
    """`canopy <role>`: one role process, as operators and the launcher start it."""
    for role in ("redis", *ROLES):
        p = sub.add_parser(role, help=f"run one {role} process")
        p.add_argument("--config", required=role != "cache")
        p.add_argument("--id", type=int, default=0)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.set_defaults(func=_role_command, role=role)
        if role == "cache":
            from canopy.cache.topology import add_plan_parser

            add_plan_parser(p.add_subparsers(dest="cache", required=False), _cache_plan)
        if role == "learner":
            p.add_argument(
                "--standby", action="store_true", help="wait warm until the active learner's lease expires"
            )
            p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where it trains")


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """Commands about a running or planned cluster: status, hosts, checkpoint, health."""
    st = sub.add_parser("status", help="table of every role of a run; exit 1 if one is dead")
    st.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help=RUN_DIR_HELP)
    st.add_argument("--watch", action="store_true", help="refresh every second")
    connection.add_options(st)
    st.set_defaults(func=_status)

    hosts = sub.add_parser("hosts", help="bare-metal clusters: which role commands run on which host")
    hosts_sub = hosts.add_subparsers(dest="hosts", required=True)
    hp = hosts_sub.add_parser("plan", help="print the role commands of CONFIG per host, in start order")
    hp.add_argument("config", help="cluster TOML whose [cluster] section lists every address")
    hp.add_argument(
        "--place",
        action="append",
        default=[],
        metavar="ROLE=HOST[,HOST...]",
        help="hosts for learner, evaluator or actor (round-robin by id)",
    )
    hp.add_argument("--json", action="store_true", help="print JSON: {hosts: [{host, commands}]}")
    hp.set_defaults(func=_hosts_plan)

    ckpt = sub.add_parser("checkpoint", help="learner checkpoints in replicated Redis shards")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint", required=True)
    plan = ckpt_sub.add_parser("plan", help="print where each checkpoint chunk goes")
    plan.add_argument("--config", help="TOML config (a run's config.toml lists its shards)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--learner", type=int, default=0, help="learner id")
    plan.add_argument("--chunks", type=int, default=8, help="chunks to list")
    plan.set_defaults(func=_checkpoint_plan)
    cl = ckpt_sub.add_parser("list", help="a run's committed checkpoints, newest first")
    cl.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help=RUN_DIR_HELP)
    connection.add_options(cl)
    cl.set_defaults(func=_checkpoint_list)

    hl = sub.add_parser("health", help="exit 0 when one role process is alive (for probes)")
    hl.add_argument("role")
    hl.add_argument("id", type=int)
    hl.add_argument("--config", required=True)
    hl.add_argument(
        "--allow-standby", action="store_true", help="a warm standby counts as healthy (liveness)"
    )
    hl.set_defaults(func=_health)

    tl = sub.add_parser("tls", help="CA and certificate for Redis over TLS in DIR/tls, DIR: the passwords'")
    tl.add_argument("dir", metavar="DIR")
    tl.add_argument(
        "--name", action="append", default=[], help="a host name or IP of the shards (repeatable)"
    )
    tl.set_defaults(func=_tls)


def _add_tools(sub: argparse._SubParsersAction) -> None:
    """Commands about envs and policies: check-env, export, eval, keys, plot."""
    ce = sub.add_parser("check-env", help="can canopy run this gymnasium env, and how fast?")
    ce.add_argument("env_id", metavar="ID")
    ce.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="env.* keys (env.kwargs)")
    ce.set_defaults(func=_check_env)

    ex = sub.add_parser("export", help="a run's best confirmed policy as safetensors or TorchScript")
    ex.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help=RUN_DIR_HELP)
    ex.add_argument("--out", required=True, help="file to write")
    ex.add_argument("--format", default="safetensors", help="safetensors | torchscript")
    ex.add_argument("--version", default="best", help=VERSION_HELP)
    ex.add_argument("--model", type=int, default=None, help=MODEL_HELP)
    connection.add_options(ex)
    ex.set_defaults(func=_export)

    ev = sub.add_parser("eval", help="greedy episodes with a run's best confirmed policy or an exported file")
    ev.add_argument("source", nargs="?", metavar="RUN_DIR|FILE", help=f"{RUN_DIR_HELP}, or an exported file")
    ev.add_argument("--episodes", type=int, default=100)
    ev.add_argument("--version", default="best", help=VERSION_HELP)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--env", default="", help="env id (default: the run's or the file's)")
    ev.add_argument("--video", default="", help="GIF of the first episode")
    ev.add_argument("--model", type=int, default=None, help=MODEL_HELP)
    connection.add_options(ev)
    ev.set_defaults(func=_eval)

    ky = sub.add_parser("keys", help="CURVE keys per role for ZeroMQ sockets; set cluster.curve_dir to DIR")
    ky.add_argument("dir", metavar="DIR")
    ky.set_defaults(func=_keys)

    pl = sub.add_parser("plot", help="PNG of learning curves and throughput of one or more runs")
    pl.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="runs of canopy up (metrics.jsonl)")
    pl.add_argument("--out", default="canopy-plot.png", help="PNG file to write")
    connection.add_options(pl)  # one more run, from its metrics stream in Redis
    pl.set_defaults(func=_plot)


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` names; its exit code (2 for a user or config error, printed as one line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"canopy: config error: {problem}", file=sys.stderr)
        return 2
    except (UserError, DeadlineExceeded) as exc:
        print(f"canopy: error: {exc}", file=sys.stderr)
        return 2
    except CanopyError as exc:
        print(f"canopy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
