"""`canopy up --ray ADDRESS`: the roles of `canopy up`, each on a node of a running Ray cluster.

Place in the data flow: the same build -> init -> run -> report as cluster/launcher.py, with
Ray in the supervisor's place. build: `prepare` (run directory, passwords, config.toml),
then every listening role gets an address on a Ray node (`assign_addresses`: Redis shards,
replay shards and cache nodes round-robin over the nodes, each port picked free on its own
node) and `hostplan.plan` says which node runs every role command. init: each role is one
Ray actor (`RoleHost`) that runs the role's `canopy <role> --config --id` command, the one
scripts/role.sh runs, as a child process; Redis first, then the rest as `Supervisor` orders
them; cluster.json once all run. run and report: cluster/monitor.py and cluster/report.py,
unchanged, since everything they read is in Redis or behind a listed address.

Who restarts: Ray. A role process that dies takes its actor with it (`os._exit`), and Ray
starts the actor again (`max_restarts`), on the same node for a listening role (its
address is that node's) and anywhere for the others when their node is gone; a restarted
learner comes back as a standby, as under canopy's supervisor, so the lease decides who
trains. Why a child process and not the role in the actor's own process: the role is then
exactly the process operators run elsewhere (its SIGTERM handling, `exec` into
redis-server, torch and CUDA state of its own), a native crash or `kill -9` of it is a
process death Ray sees, and the actor can still stop it cleanly. The child dies with its
actor (PR_SET_PDEATHSIG, canopy/lifecycle.py) and the actors with the driver (not detached).

Nodes choose roles by custom resources: a node started with `--resources
'{"canopy_actor": 1}'` is where actors go (likewise canopy_redis, canopy_replay,
canopy_cache, canopy_learner, canopy_evaluator); a role no node names goes anywhere, a
learner to GPU nodes first. The resource marks a node; it is not consumed.

Every role process reads config.toml and its secrets (its Redis password, TLS and CURVE
files; `role_files`) at the same paths on its node: its actor writes them there from what
the driver sends (a shared file system gets the same bytes again). Each role gets only its
own, but anyone who can submit work to the Ray cluster can read them in transit: Ray's own
trust boundary, as for any Ray job.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canopy import config as config_mod
from canopy import curve, tls
from canopy.cluster import hostplan
from canopy.cluster.launcher import Launcher, drive, prepare
from canopy.cluster.monitor import Monitor
from canopy.cluster.report import Report
from canopy.cluster.supervisor import Child, Supervisor
from canopy.config import Config
from canopy.errors import UserError
from canopy.keys import Keys
from canopy.lease import follower_rank
from canopy.ports import free_ports
from canopy.redisconn import credentials, tls_dir

# A role that keeps dying stops being restarted: the run then shows it dead.
MAX_RESTARTS = 20
CALL_TIMEOUT_S = 30.0  # one call to a role's actor
POLL_CACHE_S = 1.0  # the supervisor polls every child many times a second while starting
RESOURCE_PREFIX = "canopy_"  # canopy_<role>: a node offering it hosts that role
LISTENING = ("redis", "replay", "cache")


@dataclass(frozen=True)
class Node:
    """One alive Ray node: its id, address, GPUs, whether it is the head, roles it offers."""

    node_id: str
    ip: str
    gpus: float
    head: bool
    offers: frozenset[str]


def nodes_of(ray_nodes: list[dict[str, Any]]) -> list[Node]:
    """Alive nodes of `ray.nodes()`, head first, then by address."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        offers = frozenset(k.removeprefix(RESOURCE_PREFIX) for k in res if k.startswith(RESOURCE_PREFIX))
        head = "node:__internal_head__" in res
        out.append(Node(n["NodeID"], n["NodeManagerAddress"], float(res.get("GPU", 0)), head, offers))
    return sorted(out, key=lambda n: (not n.head, ipaddress.ip_address(n.ip)))


def eligible(role: str, nodes: list[Node]) -> list[Node]:
    """The nodes that may run `role`: those offering it, else (learners) GPU nodes, else all."""
    offering = [n for n in nodes if role in n.offers]
    if offering:
        return offering
    if role == "learner" and any(n.gpus for n in nodes):
        return [n for n in nodes if n.gpus]
    return nodes


def assign_addresses(cfg: Config, nodes: list[Node], ports_on: Callable[[Node, int], list[int]]) -> None:
    """Fill cfg.cluster's listening addresses with node addresses and free ports there.

    Redis shards, replay shards and cache nodes take turns over their eligible nodes, one
    rotation for all of them, so the shards spread before any node gets a second one.
    The learner group's rendezvous (several learners) goes to learner 0's node.
    """
    turn = 0
    wanted: list[tuple[str, Node, int]] = []  # (what, node, ports)
    for role, count, ports in (
        ("redis", cfg.redis.shards, 1),
        ("replay", cfg.replay.shards, 1),
        ("cache", cfg.cache.nodes, 2),
    ):
        for _ in range(count):
            where = eligible(role, nodes)
            wanted.append((role, where[turn % len(where)], ports))
            turn += 1
    if cfg.learner.learners > 1:
        wanted.append(("learner_store", eligible("learner", nodes)[0], 1))
    free: dict[str, list[int]] = {}
    for node in {n.node_id: n for _, n, _ in wanted}.values():
        free[node.node_id] = ports_on(node, sum(p for _, n, p in wanted if n.node_id == node.node_id))
    c = cfg.cluster
    c.redis, c.replay, c.cache_fetch, c.cache_notify = [], [], [], []
    for what, node, _ in wanted:
        take = free[node.node_id]
        if what == "redis":
            c.redis.append(f"{node.ip}:{take.pop()}")
        elif what == "replay":
            c.replay.append(f"tcp://{node.ip}:{take.pop()}")
        elif what == "cache":
            c.cache_fetch.append(f"tcp://{node.ip}:{take.pop()}")
            c.cache_notify.append(f"tcp://{node.ip}:{take.pop()}")
        else:
            c.learner_store = f"{node.ip}:{take.pop()}"


def placement(cfg: Config, nodes: list[Node]) -> dict[str, list[str]]:
    """`hostplan.plan`'s placement of the roles that only connect out: node addresses per role."""
    return {role: [n.ip for n in eligible(role, nodes)] for role in hostplan.PLACED_ROLES}


def node_plan(cfg: Config, config_path: str, nodes: list[Node]) -> dict[tuple[str, int], Node]:
    """(role, id) -> the node that runs it, from `hostplan.plan` with node addresses as hosts."""
    by_ip = {n.ip: n for n in nodes}
    out = {}
    for host, commands in hostplan.plan(cfg, config_path, placement(cfg, nodes), program=()).items():
        for cmd in commands:
            out[(cmd[0], int(cmd[cmd.index("--id") + 1]))] = by_ip[host]
    return out


def learner_gpu_share(cfg: Config, where: dict[tuple[str, int], Node]) -> dict[int, float]:
    """GPUs each learner on a GPU node asks Ray for: one, or a share where more learners than
    GPUs sit on a node (a one-GPU node holding learner 0 and its standby gives each half, so
    the standby can start; only one of them trains at a time). None with `learner.device = cpu`."""
    if cfg.learner.device == "cpu":
        return {}
    learners = {ident: node for (role, ident), node in where.items() if role == "learner" and node.gpus}
    per_node: dict[str, int] = {}
    for node in learners.values():
        per_node[node.node_id] = per_node.get(node.node_id, 0) + 1
    # 1/k of a GPU, k the learners one GPU must hold: fractions that Ray can pack whole.
    return {ident: 1.0 / math.ceil(per_node[node.node_id] / node.gpus) for ident, node in learners.items()}


class RoleHost:
    """A Ray actor that runs one role process on its node and dies when that process dies.

    Args:
        role, ident, config_path: the role command's (`hostplan.role_command`).
        args, restart_args: its extra flags, first and after Ray restarted this actor.
        files: path -> (bytes, mode) to lay down on this node first (config, passwords, keys).
        log: the role's log file on this node (appended to: a restart keeps the earlier lines).
    """

    def __init__(
        self,
        role: str,
        ident: int,
        config_path: str,
        args: tuple[str, ...],
        restart_args: tuple[str, ...],
        files: dict[str, tuple[bytes, int]],
        log: str,
    ) -> None:
        import ray

        for path, (data, mode) in files.items():
            _write_if_changed(Path(path), data, mode)
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        cmd = hostplan.role_command(
            role,
            ident,
            config_path,
            restart_args if self.restarted else args,
            (sys.executable, "-m", "canopy.cluster.cli"),
        )
        # The role dies with this actor's process (canopy/lifecycle.py), so a killed actor
        # leaves no role behind on its node.
        env = {**os.environ, "CANOPY_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.ip = ray.util.get_node_ip_address()
        self.stopping = False
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.proc.wait()
        if not self.stopping:
            os._exit(1)  # the role died: this actor goes with it, and Ray restarts both

    def info(self) -> dict[str, Any]:
        """pid of the role process, node address, whether Ray restarted this actor."""
        return {"pid": self.proc.pid, "host": self.ip, "restarted": self.restarted}

    def poll(self) -> int | None:
        """The role's exit code, None while it runs."""
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        """Send the role `signum`; its exit is then a stop, not a death to restart from."""
        self.stopping = True
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """The role's exit code once it exits, None if it still runs after `timeout` s."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class RemoteProcess:
    """A role process on a Ray node, seen through its actor with the Popen calls Supervisor makes."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.returncode: int | None = None
        self._info: dict[str, Any] | None = None
        self._polled = (0.0, None)  # (when, what poll() said)

    @property
    def info(self) -> dict[str, Any]:
        """`RoleHost.info` of the actor as it first started (asked once)."""
        if self._info is None:
            import ray

            self._info = ray.get(self.handle.info.remote(), timeout=CALL_TIMEOUT_S)
        return self._info

    @property
    def pid(self) -> int:
        """The role process's pid on its node, as first started."""
        return int(self.info["pid"])

    def poll(self) -> int | None:
        """The exit code of a role that is gone for good; None while it runs or Ray restarts it."""
        import ray

        if self.returncode is not None:
            return self.returncode
        when, code = self._polled
        if time.monotonic() - when < POLL_CACHE_S:
            return code
        try:
            code = ray.get(self.handle.poll.remote(), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            # Restarting, or gone for good: Ray does not tell the two apart here, and a role
            # that never comes back shows as dead in its stats hash and `canopy status`.
            code = None
        self._polled = (time.monotonic(), code)
        return code

    def send_signal(self, signum: int) -> None:
        """Signal the role (a stop: its actor then stays down); returns without waiting."""
        self.handle.signal.remote(int(signum))

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the role to exit; subprocess.TimeoutExpired after `timeout` s, like Popen."""
        import ray

        if self.returncode is not None:
            return self.returncode
        limit = CALL_TIMEOUT_S if timeout is None else timeout
        try:
            code = ray.get(self.handle.wait.remote(limit), timeout=limit + CALL_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            code = -1
        except ray.exceptions.GetTimeoutError:
            code = None  # its node does not answer: the caller kills the actor
        if code is None:
            raise subprocess.TimeoutExpired("role", limit)
        self.returncode = code
        ray.kill(self.handle, no_restart=True)
        return code

    def kill(self) -> None:
        """End the actor for good, and with it the role."""
        import ray

        ray.kill(self.handle, no_restart=True)  # its role dies with it (PR_SET_PDEATHSIG)
        self.returncode = -int(signal.SIGKILL)


class RaySupervisor(Supervisor):
    """`Supervisor` whose children are Ray actors on the nodes of `where`; Ray heals them."""

    def __init__(
        self, cfg: Config, run_dir: Path, config_path: Path, keys: Keys, where: dict[tuple[str, int], Node]
    ) -> None:
        super().__init__(cfg, run_dir, config_path, keys)
        self.where = where
        self.gpu_share = learner_gpu_share(cfg, where)

    def spawn(
        self, role: str, ident: int, endpoints: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Child:
        """Start role process `ident` of `role` in a Ray actor on its planned node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = self.where[(role, ident)]
        follower = follower_rank(self.cfg.learner.learners, ident) is not None
        restart_args = ("--standby",) if role == "learner" and not follower else args
        log = self.run_dir / "logs" / f"{role}-{ident}.log"
        listening = role in LISTENING
        # A listening role stays on its node (its address is there); the others may move
        # when their node is gone. It asks for no CPU slot: it is bound to that one node, so
        # it must never wait there for a slot the actors and learners hold.
        strategy = NodeAffinitySchedulingStrategy(node.node_id, soft=not listening)
        actor = _role_host_class().options(
            num_cpus=0 if listening else 1,
            num_gpus=self.gpu_share.get(ident, 0.0) if role == "learner" else 0.0,
            max_restarts=MAX_RESTARTS,
            scheduling_strategy=strategy,
            name=f"canopy-{self.cfg.run.name}-{role}-{ident}",
        )
        files = role_files(self.cfg, self.config_path, role, ident)
        handle = actor.remote(role, ident, str(self.config_path), args, restart_args, files, str(log))
        child = Child(role, ident, RemoteProcess(handle), log, endpoints or {}, args, "--standby" in args)  # type: ignore[arg-type]
        self.children.append(child)
        return child

    def heal(self) -> None:
        """Nothing to do: Ray restarts a dead role's actor (`max_restarts`)."""

    def describe(self) -> dict[str, Any]:
        """cluster.json as `canopy up` writes it, each role with the node it started on."""
        doc = super().describe()
        for role, entries in doc["roles"].items():
            for entry, child in zip(entries, self.role(role), strict=True):
                entry["host"] = child.proc.info["host"]  # type: ignore[attr-defined]
        doc["launcher"] = "ray"
        return doc

    def shutdown(self) -> None:
        """Stop every role in order, then end the actors of roles that were already gone."""
        import ray

        try:
            super().shutdown()
        finally:
            for ch in self.children:
                with contextlib.suppress(Exception):  # already dead, or the node is gone
                    ray.kill(ch.proc.handle, no_restart=True)  # type: ignore[attr-defined]


class RayLauncher(Launcher):
    """`Launcher` on a Ray cluster: the same start and finish, Ray's actors in place of children."""

    def __init__(self, cfg: Config, address: str) -> None:
        import ray

        self.cfg = cfg
        self.resume = False
        self.adopted = None
        self.t0 = time.monotonic()
        self.started_at = time.time()
        self.run_dir, config_path = prepare(cfg, resume=False)
        nodes = nodes_of(ray.nodes())
        if not nodes:
            raise UserError(f"the Ray cluster at {address} has no alive node")
        assign_addresses(cfg, nodes, _free_ports_on)
        if cfg.cluster.tls:  # the shards' certificate names their nodes' addresses
            tls.generate(tls_dir(cfg.cluster), [a.rpartition(":")[0] for a in cfg.cluster.redis])
        config_mod.save(cfg, config_path)
        keys = Keys(cfg.run.name)
        where = node_plan(cfg, str(config_path), nodes)
        self.supervisor = RaySupervisor(cfg, self.run_dir, config_path, keys, where)
        self.monitor = Monitor(self.supervisor, self.t0, self.started_at)
        self.report = Report(cfg, self.supervisor.r, keys, False, self.t0, self.started_at)


def up(cfg: Config, address: str) -> dict[str, Any]:
    """Run every role on the Ray cluster at `address` until solved, out of time or signalled.

    Returns summary.json's content, as `launcher.up` does.
    """
    try:
        import ray
    except ImportError:
        raise UserError("canopy up --ray needs Ray on this machine: pip install 'canopy-rl[ray]'") from None
    curve.use(curve.load(cfg.cluster, curve.OPERATOR))  # for its own requests to the replay shards
    try:
        ray.init(address=address, log_to_driver=False, logging_level="warning")
    except ConnectionError as exc:
        raise UserError(f"no Ray cluster at {address}: {exc} (start one with `ray start --head`)") from None
    try:
        launcher = RayLauncher(cfg, address)
        banner = f"canopy: run {cfg.run.name} on Ray at {address}, in {launcher.run_dir}"
        return drive(launcher, banner, "starting every role on its Ray node")
    finally:
        ray.shutdown()


@functools.cache
def _role_host_class() -> Any:
    """RoleHost as a Ray actor class, made once per driver (Ray exports it on first use)."""
    import ray

    return ray.remote(RoleHost)


def _free_ports_on(node: Node, count: int) -> list[int]:
    """`count` ports free a moment ago on `node`, asked there by a Ray task."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(free_ports).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    )
    return ray.get(task.remote(count, node.ip), timeout=CALL_TIMEOUT_S)


def role_files(cfg: Config, config_path: Path, role: str, ident: int) -> dict[str, tuple[bytes, int]]:
    """What role process `ident` of `role` reads from disk, and no more, as path -> (bytes, mode):
    config.toml; its own Redis password (a Redis shard: every password, it writes them all
    into its users); with `cluster.tls` the CA certificate (a shard: its certificate and key
    too); with CURVE its own keys (`curve.mounts`)."""
    c = cfg.cluster
    paths = [config_path]
    if role == "redis":
        paths += [Path(c.password_file), *Path(c.password_file).parent.glob("redis.*.password")]
        paths += list(tls.server_files(tls_dir(c))) if c.tls else []
    else:
        paths.append(credentials(c, role, ident)[1])
        paths += [tls.ca_file(tls_dir(c))] if c.tls else []
        if c.curve_dir:
            d = Path(c.curve_dir)
            for m in curve.mounts(role):
                paths += sorted(p for p in (d / m).rglob("*") if p.is_file()) if m.endswith("/") else [d / m]
    return {str(p): (p.read_bytes(), p.stat().st_mode & 0o777) for p in paths if p.is_file()}


def _write_if_changed(path: Path, data: bytes, mode: int) -> None:
    """Lay `data` at `path` (mode `mode`) unless it is there already; atomic for readers."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
