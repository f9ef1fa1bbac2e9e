"""Cut-off faults of `canopy bench faults`: a host of a bare-metal cluster loses its network.

The cluster is the deploy one (deploy/cluster.toml: CURVE on every socket, a Redis user per
role) on network-namespace hosts (cluster/netns.py): `redis` (both shards), `data` (replay
shard and cache node), `learner` (learner 0 and the evaluator), `standby` (learner 1, warm)
and `actors`. Every host runs exactly the commands `canopy hosts plan` prints for it, and
nothing restarts a role: what survives a cut survives it on its own, as on bare metal.

The cut takes the bridge side of the host's link down: no resets, packets just vanish, as
with a pulled cable. Faults:

- `cut-actors`: the actors' host is cut until their liveness deadlines have passed (what
  `canopy status` reports as dead: detection), then plugged back in; recovered when every
  actor is alive again, has stepped on, and acts with a version newer than the one that was
  newest at the reconnect. No actor process may exit.
- `cut-learner`: the active learner's host is cut; detection is the standby's `failover`
  event (its lease expired), recovery the first version of the new epoch. The link comes
  back once the standby published: the cut-off learner must then stop (fenced), and
  nothing of its epoch may be published or committed after the link came back.

Redis is read with redis-cli from the `redis` host, which is never cut.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from canopy import config as config_mod
from canopy import tls
from canopy.cache import ledger
from canopy.cluster import netns
from canopy.cluster.bench import harness
from canopy.cluster.bench.outcome import ACTOR_STEPS, RECOVER_TIMEOUT_S, Outcome
from canopy.errors import DeadlineExceeded, UserError
from canopy.keys import Keys
from canopy.lease import parse_token
from canopy.lifecycle import wait_until
from canopy.version import Version

CUT_FAULTS = ("cut-actors", "cut-learner")
# Goals (s) from the cut (detection) or from the reconnect (actors) / the cut (learner).
GOALS_S = {"cut-actors": 20.0, "cut-learner": 15.0}
HOSTS = ("redis", "data", "learner", "standby", "actors")
PLACEMENT = {"learner": "learner,standby", "evaluator": "learner", "actor": "actors"}
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
CUT_MIN_S = 3.0  # a cut lasts at least this long past its detection
# Small and quick on top of the deploy config: every role of five hosts shares a few cores.
SPEEDUPS: dict[str, dict[str, Any]] = {
    "replay": {"min_size": 300, "capacity": 20_000},
    "learner": {"device": "cpu", "hidden": [64, 64], "batch_size": 64, "publish_every": 10},
    "actors": {"count": 2, "envs": 2, "chunk": 32},
    "eval": {"episodes": 1, "min_interval_s": 5.0},
    # A lease of a few seconds: CPU starvation on a small machine must not look like a cut.
    # No retention: every checkpoint committed before a cut must still be there after it.
    "checkpoint": {"standby": True, "lease_ttl_s": 3.0, "every_s": 2.0, "keep": 200},
    "redis": {"maxmemory_mb": 128},
    "run": {"heartbeat_s": 0.5},
}


def deploy_config(
    net: netns.Network, workdir: Path, speedups: dict[str, dict[str, Any]]
) -> tuple[Path, str, list[str]]:
    """deploy/cluster.toml with its service names swapped for the hosts of `net` (redis on
    `redis`, replay and cache on `data`) and its secrets made by the compose `keys` service's
    command under `workdir`, the TLS certificate made again for the redis host's address (as
    `canopy tls DIR --name ADDRESS` on bare metal); (config file, operator password, the
    redis-cli options that reach the shards: host, TLS and user)."""
    source = REPO_ROOT / "deploy" / "cluster.toml"
    if not source.exists():
        raise UserError(f"{source} not found: the cut-off faults run from a canopy source checkout")
    doc = tomllib.loads(source.read_text())
    redis_ip, data_ip = net["redis"].address, net["data"].address
    secrets = workdir / "secrets"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "deploy" / "make_secrets.py"), str(secrets)], check=True, timeout=60
    )
    password_file = secrets / "redis.password"
    tls.generate(secrets / "tls", [redis_ip])
    doc["cluster"].update(
        redis=[f"{redis_ip}:6379", f"{redis_ip}:6380"],
        replay=[f"tcp://{data_ip}:5555"],
        cache_fetch=[f"tcp://{data_ip}:5556"],
        cache_notify=[f"tcp://{data_ip}:5557"],
        password_file=str(password_file),
        curve_dir=str(secrets / "curve"),
    )
    for section, values in speedups.items():
        doc.setdefault(section, {}).update(values)
    doc["run"].update(name=f"netns-{uuid.uuid4().hex[:8]}", dir=str(workdir / "run"))
    path = workdir / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    cli = ["-h", redis_ip, "-p", "6379", "--user", "canopy", "--raw"]
    if doc["cluster"].get("tls"):
        cli += ["--tls", "--cacert", str(secrets / "tls" / tls.CA_CERT)]
    return path, password_file.read_text().strip(), cli


def host_plan(
    config: Path, net: netns.Network, placement: dict[str, str]
) -> list[tuple[netns.Host, list[list[str]]]]:
    """`canopy hosts plan` for `config`, roles placed on the hosts `placement` names
    (role -> comma-separated host names); [(host, its commands)] in start order."""
    places = [
        f"--place={role}={','.join(net[h].address for h in hosts.split(','))}"
        for role, hosts in placement.items()
    ]
    out = subprocess.run(
        harness.canopy("hosts", "plan", str(config), *places, "--json"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    by_address = {h.address: h for h in net.hosts.values()}
    return [(by_address[entry["host"]], entry["commands"]) for entry in json.loads(out)["hosts"]]


class NetnsCluster:
    """The deploy cluster on namespace hosts, started from the host plan; a context manager.

    Example:
        with netns.Network(HOSTS) as net, NetnsCluster(net, Path("/tmp/cut")) as c:
            c.wait_training()
            outcome = c.cut_actors()
    """

    def __init__(self, net: netns.Network, workdir: Path, speedups: dict[str, dict[str, Any]] = SPEEDUPS):
        self.net = net
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config, self.password, self.cli_options = deploy_config(net, workdir, speedups)
        self.cfg = config_mod.load(self.config)
        self.keys = Keys(self.cfg.run.name)
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}  # "role-id" -> its process
        self.leftover: list[str] = []
        # The roles die with this process; `canopy` on PATH is this interpreter's.
        self.env = harness.child_env(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )

    def __enter__(self) -> NetnsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading Redis from the redis host ----------------------------------------
    def cli(self, *args: str) -> str:
        """One redis-cli command as the operator, from the `redis` host; "" when it fails."""
        result = self.net["redis"].run(
            ["redis-cli", *self.cli_options, *args],
            env={**self.env, "REDISCLI_AUTH": self.password},
            timeout=10,
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    def proc(self, role: str, ident: int) -> dict[str, str]:
        """A role process's stats hash ({} when it cannot be read)."""
        flat = self.cli("HGETALL", self.keys.proc(role, ident)).splitlines()
        return dict(zip(flat[::2], flat[1::2], strict=False))

    def counter(self, role: str, ident: int, name: str) -> int:
        """One numeric field of a role process's stats hash, as an int (0 when absent)."""
        return int(float(self.cli("HGET", self.keys.proc(role, ident), name) or 0))

    def latest(self) -> Version | None:
        """`model:latest`; None before the first publish."""
        value = self.cli("GET", self.keys.model_latest)
        return Version.parse(value) if value else None

    def now(self) -> float:
        """The Redis server's clock (TIME) in seconds, what liveness deadlines are compared with here."""
        seconds, micros = self.cli("TIME").split()
        return int(seconds) + int(micros) / 1e6

    def deadline(self, role: str, ident: int) -> float:
        """A role process's liveness deadline in `alive:<role>` (0.0 when it has none)."""
        value = self.cli("ZSCORE", self.keys.alive(role), str(ident))
        return float(value) if value else 0.0

    def active_learner(self) -> int | None:
        """The id of the learner holding the lease; None when none does."""
        held = parse_token(self.cli("GET", self.keys.lease))
        return held[1] if held is not None else None

    def events_since(self, t: float, kind: str) -> list[dict[str, str]]:
        """The fields of every `kind` event in the stream from wall time `t` on."""
        lines = self.cli("XRANGE", self.keys.events, f"{int(t * 1000)}-0", "+").splitlines()
        # --raw XRANGE prints: id, then field/value lines; entries start at a line "<ms>-<seq>".
        out: list[dict[str, str]] = []
        current: list[str] = []
        for line in [*lines, "0-0"]:
            if _is_entry_id(line) and (len(current) % 2 == 1 or not current):
                if current:
                    fields = dict(zip(current[1::2], current[2::2], strict=False))
                    if fields.get("kind") == kind:
                        out.append(fields)
                current = [line]
            else:
                current.append(line)
        return out

    def committed(self) -> list[str]:
        """Ids of the committed checkpoints, from `ckpt:index`."""
        return self.cli("ZRANGE", self.keys.ckpt_index, "0", "-1").splitlines()

    def versions_of_epoch_since(self, epoch: int, t: float) -> list[str]:
        """Versions of `epoch` the ledger says were published at or after wall time `t`."""
        keys = self.cli("--scan", "--pattern", self.keys.ledger_version(f"{epoch}.*")).splitlines()
        out = []
        for key in keys:
            published = ledger.published_at(self.cli("HGET", key, ledger.PUBLISHED_AT))
            if published is not None and published >= t:
                out.append(key.rpartition(":")[2])
        return out

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Every host's commands of the host plan, in order; Redis shard 0 must answer before the rest."""
        for host, commands in host_plan(self.config, self.net, PLACEMENT):
            for cmd in commands:
                name = f"{cmd[1]}-{cmd[cmd.index('--id') + 1]}"
                with open(self.logs / f"{name}.log", "wb") as log:
                    self.procs[name] = host.popen(
                        cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
                    )
            if host.name == "redis":
                self._wait(lambda: self.cli("PING") == "PONG", 20.0, "Redis shard 0 to answer")

    def wait_training(self) -> None:
        """Versions published, actors stepping, the standby warm, a checkpoint committed."""

        def training() -> bool:
            return (
                self.counter("learner", 0, "versions_published_total") >= 3
                and all(self.counter("actor", i, "env_steps_total") > 0 for i in range(self.cfg.actors.count))
                and self.proc("learner", 1).get("state") == "standby"
                and bool(self.committed())
            )

        self._wait(training, START_TIMEOUT_S, "versions published, actors stepping, a standby, a checkpoint")

    def exited(self) -> list[str]:
        """Names (`role-id`) of the role processes that have exited."""
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def _wait(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
        try:
            return wait_until(predicate, timeout, what, interval)
        except DeadlineExceeded as exc:
            tails = [
                f"{p.name}: {p.read_text(errors='replace')[-300:]!r}" for p in sorted(self.logs.iterdir())
            ]
            raise UserError(f"{exc} (exited: {self.exited()}); logs: {' | '.join(tails)}") from None

    def close(self) -> None:
        """Stop every role, actors first and Redis last; `leftover` names any that would not stop."""
        for name, proc in reversed(list(self.procs.items())):  # one at a time: each after its clients
            if harness.stop([proc], 15.0):
                self.leftover.append(name)

    # ---- faults ---------------------------------------------------------------------
    def inject(self, fault: str) -> Outcome:
        """One cut-off fault, then the checks: a newer version follows, no committed checkpoint is lost."""
        out = Outcome(fault, "", GOALS_S[fault])
        before = self.latest() or Version(0, 0)
        out.version_before = str(before)
        committed = self.committed()
        try:
            recovered = self.cut_actors(out) if fault == "cut-actors" else self.cut_learner(out, before)
            later = self._wait(
                lambda: (v := self.latest()) is not None and v > recovered and v,
                RECOVER_TIMEOUT_S,
                f"a version newer than {recovered}",
            )
            out.version_after = str(later)
            out.versions_increasing = later > before
            present = set(self.committed())
            out.checkpoints_checked = len(committed)
            out.checkpoints_lost = [c for c in committed if c not in present]
        except UserError as exc:
            out.error = str(exc)
        return out

    def cut_actors(self, out: Outcome) -> Version:
        """Cut the actors' host until they count as dead, reconnect it, time their recovery.

        Returns the newest version once they recovered.
        """
        n = self.cfg.actors.count
        out.target = f"host actors ({n} actors)"
        t = time.time()
        self.net.set_link("actors", False)
        try:
            self._wait(
                lambda: (now := self.now()) and all(self.deadline("actor", i) < now for i in range(n)),
                RECOVER_TIMEOUT_S,
                "the cut-off actors' liveness deadlines to pass",
            )
            out.detect_s, out.detected_by = round(time.time() - t, 3), "liveness deadline passed"
            time.sleep(CUT_MIN_S)  # a real outage: longer than its own detection
        finally:
            at_reconnect = self.latest() or Version(0, 0)
            steps = {i: self.counter("actor", i, "env_steps_total") for i in range(n)}
            t_back = time.time()
            self.net.set_link("actors", True)
        out.target += f", cut for {t_back - t:.1f}s"

        def back() -> bool:
            if dead := [name for name in self.exited() if name.startswith("actor")]:
                raise UserError(f"{dead} exited during the cut")
            now = self.now()
            for i in range(n):
                h = self.proc("actor", i)
                if self.deadline("actor", i) < now or "policy_version" not in h:
                    return False
                if int(h.get("env_steps_total", 0)) < steps[i] + ACTOR_STEPS:
                    return False
                if Version.parse(h["policy_version"]) <= at_reconnect:
                    return False
            return True

        self._wait(back, RECOVER_TIMEOUT_S, f"every actor alive, stepping, past {at_reconnect}")
        out.recover_s = round(time.time() - t_back, 3)
        out.recovered_by = "every actor alive on a newer version (from the reconnect)"
        return self.latest() or at_reconnect

    def cut_learner(self, out: Outcome, before: Version) -> Version:
        """Cut the active learner's host until its standby published; the cut-off one must stop unheard.

        Returns the first version of the standby's epoch.
        """
        active = self.active_learner()
        if active is None:
            raise UserError("no learner holds the lease")
        host = self.proc("learner", active).get("host", "")
        cut = next((h for h in self.net.hosts.values() if h.netns == host), None)
        if cut is None:
            raise UserError(f"learner {active} reports host {host!r}, not one of this network")
        out.target = f"host {cut.name} (learner {active}, epoch {before.epoch})"
        t = time.time()
        self.net.set_link(cut.name, False)
        try:
            self._wait(
                lambda: self.events_since(t, "failover"), RECOVER_TIMEOUT_S, "the standby's failover event"
            )
            out.detect_s, out.detected_by = round(time.time() - t, 3), "failover"
            v = self._wait(
                lambda: (v := self.latest()) is not None and v.epoch > before.epoch and v,
                RECOVER_TIMEOUT_S,
                "a version of a newer epoch",
            )
            out.recover_s, out.recovered_by = round(time.time() - t, 3), f"first version of epoch {v.epoch}"
            time.sleep(CUT_MIN_S)
        finally:
            t_back = time.time()
            self.net.set_link(cut.name, True)
        out.target += f", cut for {t_back - t:.1f}s"
        learner = self.procs[f"learner-{active}"]
        try:
            wait_until(lambda: learner.poll() is not None, RECOVER_TIMEOUT_S, "the cut-off learner to stop")
            out.fenced = True
        except DeadlineExceeded:
            out.fenced = False
        out.zombie_writes = self.versions_of_epoch_since(before.epoch, t_back)
        out.zombie_writes += [
            f"checkpoint {e['ckpt']}"
            for e in self.events_since(t_back, "checkpoint_commit")
            if Version.parse(e["ckpt"]).epoch == before.epoch
        ]
        return v


def _is_entry_id(line: str) -> bool:
    ms, dash, seq = line.partition("-")
    return bool(dash) and ms.isdigit() and seq.isdigit()


def run(faults: list[str], workdir: Path) -> tuple[list[Outcome], list[str]]:
    """Every cut-off fault in `faults` on one namespace cluster; (outcomes, roles left behind).

    Where namespaces cannot be built, each fault comes back with its error saying why.
    """
    reason = netns.unavailable_reason()
    if reason is not None:
        return [Outcome(f, "", GOALS_S[f], error=f"skipped: {reason}") for f in faults], []
    outcomes = []
    with netns.Network(HOSTS) as net:
        cluster = NetnsCluster(net, workdir)
        try:
            cluster.start()
            cluster.wait_training()
            for fault in faults:
                outcomes.append(cluster.inject(fault))
        finally:
            cluster.close()
    return outcomes, cluster.leftover
