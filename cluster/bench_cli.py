"""`canopy bench <name>`: the bench subcommands' flags, for cluster/cli.py's parser.

Each bench is a module of cluster/bench whose `main(args)` gets these flags; the module is
imported only when its bench runs.
"""

from __future__ import annotations

import argparse
import importlib


def _bench(args: argparse.Namespace) -> int:
    # Each bench module is imported only when run: some pull in torch or spawn processes.
    return importlib.import_module(f"canopy.cluster.bench.{args.bench}").main(args)


def add(sub: argparse._SubParsersAction) -> None:
    """`canopy bench <name>`: each bench module's flags."""
    bench = sub.add_parser("bench", help="benchmarks that print JSON with in-run baselines")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    _add_bench_runs(bench_sub)
    _add_bench_parts(bench_sub)
    _add_bench_faults(bench_sub)


def _add_bench_runs(bench_sub: argparse._SubParsersAction) -> None:
    """Benches of whole `canopy up` runs: e2e, zoo."""
    e2e = bench_sub.add_parser("e2e", help="time to solve through canopy up, per seed")
    e2e.add_argument("--env", default="CartPole-v1")
    e2e.add_argument("--seeds", type=int, default=3)
    e2e.add_argument("--threshold", type=float, default=475.0)
    e2e.add_argument("--time-limit", type=float, default=300.0)
    e2e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e2e.add_argument("--json", required=True, help="file for the result")
    e2e.add_argument("--no-baseline", action="store_true", help="skip SB3 PPO even if installed")
    e2e.set_defaults(func=_bench)
    zoo = bench_sub.add_parser("zoo", help="canopy vs SB3 (rl-zoo hyperparameters) at one wall-clock budget")
    zoo.add_argument("--envs", default="CartPole-v1,Pendulum-v1", help="comma-separated gymnasium ids")
    zoo.add_argument("--seeds", type=int, default=3)
    zoo.add_argument("--budget-s", type=float, default=120.0, help="wall-clock budget of every run")
    zoo.add_argument(
        "--threshold", action="append", default=[], metavar="ENV=R", help="solved threshold of an env"
    )
    zoo.add_argument("--json", required=True, help="file for the result")
    zoo.add_argument("--plot", default="", help="PNG of return vs wall clock and env steps")
    zoo.add_argument("--work-dir", default="", help="where run dirs go (default runs/zoo-<time>)")
    zoo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="canopy up override")
    zoo.add_argument(
        "--algorithms",
        default="auto",
        help="canopy learner.algorithm values, comma-separated (auto, dqn, td3, sac, ppo, impala, r2d2): "
        "one system each, auto as 'canopy', others as 'canopy-<name>'",
    )
    zoo.add_argument(
        "--sb3-algos", default="", help="SB3 algorithms to run, comma-separated (default: all that fit)"
    )
    zoo.add_argument(
        "--ceiling-s",
        type=float,
        default=3.0,
        help="seconds of the random-action throughput ceiling per env (0: not measured)",
    )
    zoo.add_argument("--skip-sb3", action="store_true", help="run canopy only")
    zoo.add_argument("--sb3-threads", type=int, default=1, help="torch threads of SB3 (0: torch's default)")
    zoo.set_defaults(func=_bench)


def _add_bench_parts(bench_sub: argparse._SubParsersAction) -> None:
    """Benches of one part of the system: broadcast, replay, learner, actors."""
    bc = bench_sub.add_parser("broadcast", help="model broadcast: cache tree vs flat Redis vs one PUB socket")
    bc.add_argument("--actors", type=int, default=1000)
    bc.add_argument("--model-mb", type=float, default=8.0)
    bc.add_argument("--hosts", type=int, default=2, help="simulated hosts (one leaf node + shm ring each)")
    bc.add_argument("--tier1", type=int, default=1, help="cache nodes directly under Redis")
    bc.add_argument("--workers", type=int, default=0, help="actor processes (default: one per host)")
    bc.add_argument("--versions", type=int, default=3)
    bc.add_argument("--codec", default="raw", choices=("raw", "bf16", "int8delta"))
    bc.add_argument("--keyframe-every", type=int, default=16)
    bc.add_argument("--netns", action="store_true", help="one network namespace per host (root only)")
    bc.add_argument("--rate-mbit", type=float, default=0.0, help="with --netns: each host's link rate")
    bc.add_argument("--tls", action="store_true", help="tree and flat again over TLS, beside plaintext")
    bc.add_argument("--json", required=True)
    bc.set_defaults(func=_bench)
    rb = bench_sub.add_parser("replay", help="replay shard throughput across processes vs numpy and ZeroMQ")
    rb.add_argument("--json", required=True, help="file for the result")
    rb.add_argument("--atari-items", type=int, default=20000, help="Atari-size transitions per shard")
    rb.add_argument("--snapshot-items", type=int, default=20000, help="Atari transitions when snapshotting")
    rb.add_argument("--seconds", type=float, default=2.0, help="timing window per figure")
    rb.add_argument("--quick", action="store_true", help="one shard only, no snapshot figure")
    rb.set_defaults(func=_bench)
    lb = bench_sub.add_parser(
        "learner", help="DQN updates/s (MLP and Nature CNN) vs bare PyTorch; multi-model overlap gain"
    )
    lb.add_argument("--json", required=True, help="file to write the results to")
    lb.add_argument("--seconds", type=float, default=5.0, help="timing window per workload")
    lb.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    lb.add_argument("--models", type=int, default=4, help="models trained together (overlap figure)")
    lb.add_argument("--ranks", type=int, default=2, help="gloo ranks for the overlap figure")
    lb.add_argument("--overlap-seconds", type=float, default=8.0, help="timing window of the overlap figure")
    lb.set_defaults(func=_bench)
    ab = bench_sub.add_parser("actors", help="actor env steps/s vs random vector-env stepping")
    ab.add_argument("--json", required=True, help="file to write the results to")
    ab.add_argument("--seconds", type=float, default=5.0, help="timing window per workload")
    ab.add_argument("--envs", type=int, nargs="+", default=[8, 32], help="vector env sizes")
    ab.set_defaults(func=_bench)


def _add_bench_faults(bench_sub: argparse._SubParsersAction) -> None:
    """Benches of load, faults and recovery: soak, faults, checkpoint."""
    sk = bench_sub.add_parser(
        "soak", help="a long canopy up under simulated actors: errors, RSS and Redis memory growth"
    )
    sk.add_argument("--json", required=True, help="file to write the results to")
    sk.add_argument("--actors", type=int, default=1000, help="simulated actors")
    sk.add_argument("--minutes", type=float, default=10.0)
    sk.add_argument("--processes", type=int, default=8, help="worker processes for the actors")
    sk.add_argument("--period", type=float, default=1.0, help="seconds between a simulated actor's inserts")
    sk.add_argument("--set", action="append", default=[], help="config key=value for the run (repeatable)")
    sk.set_defaults(func=_bench)
    fb = bench_sub.add_parser("faults", help="the fault matrix: kills, a paused learner, on a live canopy up")
    fb.add_argument("--json", required=True, help="file to write the results to")
    fb.add_argument(
        "--faults",
        default="actor,replay,cache,redis,learner,standby,zombie,takeover,cold,root,cut-actors,cut-learner",
        help="comma-separated, run in this order",
    )
    fb.add_argument(
        "--repeat", type=int, default=3, help="kills of each of takeover and cold; the worst counts"
    )
    fb.set_defaults(func=_bench)
    ck = bench_sub.add_parser("checkpoint", help="cost of checkpointing to Redis shards; recovery time")
    ck.add_argument("--state-mb", type=float, default=128.0, help="state size (online+target+Adam)")
    ck.add_argument("--duration", type=float, default=60.0, help="seconds of training per arm")
    ck.add_argument("--period", type=float, default=15.0, help="seconds between checkpoints")
    ck.add_argument("--batch", type=int, default=64, help="training batch size")
    ck.add_argument("--shards", type=int, default=4, help="redis-server processes")
    ck.add_argument("--hosts", type=int, default=2, help="pretend hosts the shards are grouped into")
    ck.add_argument("--replicas", type=int, default=2, help="R: copies of every chunk")
    ck.add_argument("--recovery-trials", type=int, default=2)
    ck.add_argument("--baseline-trials", type=int, default=3)
    ck.add_argument("--no-recovery", action="store_true", help="skip the kill/recovery trials")
    ck.add_argument("--no-dcp", action="store_true", help="skip the torch.distributed.checkpoint baseline")
    ck.add_argument("--workdir", help="parent of the temporary directory (the torch.save disk)")
    ck.add_argument("--tls", action="store_true", help="the arms and recovery again on TLS shards")
    ck.add_argument("--json", required=True, help="file for the result")
    ck.set_defaults(func=_bench)
