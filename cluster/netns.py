"""Several "hosts" on one Linux machine: network namespaces on a bridge, each its own address.

Tests and benchmarks use it to run canopy roles as on separate machines without docker:
every host is a network namespace with one veth link into a bridge in the root namespace,
an address of its own (10.77.0.1, .2, ... by default), an optional `tc` rate limit and
delay on its link, and its own host name (`unshare --uts`), so same-host shortcuts such as
the cache's shared-memory ring are not taken between hosts. The root namespace gets no
address, so several networks with the same subnet can exist at once without clashing.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` (iproute2), `tc` and `unshare`;
`unavailable_reason()` says in one line why not, for a test to skip with. Where a Docker
engine has put bridged frames through iptables with a FORWARD policy of DROP, each network
adds one ACCEPT rule for its own bridge (and removes it on close).

Example:
    with Network(["redis", "learner"], rate_mbit=1000) as net:
        server = net["redis"].popen(["redis-server", "--bind", net["redis"].address])
        net["learner"].run(["redis-cli", "-h", net["redis"].address, "ping"])
        ...  # stop what you started; close() kills whatever popen() started and is still alive
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from canopy.errors import UserError

IP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# `ip netns exec` enters the namespace, `unshare --uts` gives the host its own name; each
# step execs the next, so the pid of the returned process is the pid of the command itself.
_ENTER = 'hostname "$0" && exec "$@"'


class NetnsError(UserError):
    """A namespace, link or qdisc could not be made."""


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be built here (one line), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN): run as root or in a privileged container"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install iproute2 and util-linux"
    # The same kinds of objects a Network makes, so a kernel without bridges or veth says so.
    probe = Network(["probe"])
    try:
        probe.create()
    except NetnsError as exc:
        return f"cannot build network namespaces here: {exc}"
    probe.close()
    return None


@dataclass(frozen=True)
class Host:
    """One namespace: its label, namespace name, address on the bridge and host name."""

    name: str
    netns: str
    address: str
    network: Network = field(repr=False, compare=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as a command that runs inside this host (for logs or a shell)."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", _ENTER, self.netns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start `argv` inside this host; the network stops it on close() if it still runs."""
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self.network.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run `argv` inside this host to completion (stdout and stderr captured as text)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)


class Network:
    """Namespaces named after `names`, joined by one bridge; a context manager.

    Args:
        names: one label per host, in address order (the first gets the subnet's first address).
        subnet: the hosts' subnet.
        rate_mbit: when > 0, each link is limited to this rate in both directions (tbf).
        delay_ms: when > 0, each link adds this one-way delay in both directions (needs the
            kernel's netem qdisc; NetnsError says so where it is missing).
            `shape()` changes one host's link later.

    Names of namespaces and links are unique per Network (a random tag), so parallel test
    runs never collide. Everything is removed on close(), also when building failed halfway.
    """

    def __init__(
        self,
        names: Sequence[str],
        subnet: str = "10.77.0.0/24",
        rate_mbit: float = 0.0,
        delay_ms: float = 0.0,
    ):
        net = ipaddress.ip_network(subnet)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and non-empty, got {list(names)}")
        if len(names) > min(net.num_addresses - 2, 99):
            raise ValueError(f"{len(names)} hosts do not fit in {subnet} (at most 99 per network)")
        self.tag = f"cn{secrets.token_hex(3)}"
        self.prefixlen = net.prefixlen
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.bridge = f"{self.tag}br"
        self.procs: list[subprocess.Popen] = []
        addresses = net.hosts()
        self.hosts = {name: Host(name, f"{self.tag}-{name}", str(next(addresses)), self) for name in names}
        self._made: list[list[str]] = []  # commands that undo what was built, newest last

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Network:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        """Build the bridge, namespaces and links; on any failure remove what was built and raise."""
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(["ip", "link", "del", self.bridge])
            _ip("link", "set", self.bridge, "up")
            self._let_bridged_traffic_pass()
            for i, host in enumerate(self.hosts.values()):
                self._add_host(i, host)
        except BaseException:
            self.close()
            raise

    def _let_bridged_traffic_pass(self) -> None:
        # Once br_netfilter is loaded (a Docker engine loads it), frames between two ports of a
        # bridge go through iptables' FORWARD chain, whose policy Docker sets to DROP: hosts on
        # our bridge could not reach each other. One ACCEPT rule for this bridge, first in the
        # chain, lets them through without touching anyone else's rules.
        if not _bridged_frames_reach_iptables():
            return
        if shutil.which("iptables") is None:
            raise NetnsError(
                "frames on a bridge pass through iptables here (br_netfilter is loaded), but "
                "`iptables` is missing to let them through: install iptables"
            )
        rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        _run(["iptables", "-w", "10", "-I", *rule])
        self._made.append(["iptables", "-w", "10", "-D", *rule])

    def _add_host(self, i: int, host: Host) -> None:
        outside, inside = f"{self.tag}v{i}", f"{self.tag}p{i}"
        _ip("netns", "add", host.netns)
        self._made.append(["ip", "netns", "del", host.netns])
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._made.append(["ip", "link", "del", outside])  # deleting one end deletes the pair
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("link", "set", inside, "netns", host.netns)
        ns = ("-n", host.netns)
        _ip(*ns, "link", "set", inside, "name", "eth0")
        _ip(*ns, "addr", "add", f"{host.address}/{self.prefixlen}", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")
        _ip(*ns, "link", "set", "lo", "up")
        if self.rate_mbit > 0 or self.delay_ms > 0:
            self.shape(host.name, self.rate_mbit, self.delay_ms)

    def shape(self, name: str, rate_mbit: float = 0.0, delay_ms: float = 0.0) -> None:
        """Limit host `name`'s link to `rate_mbit` with `delay_ms` one way, in both directions.

        0 and 0 lift every limit. Rate alone uses tbf; a delay needs netem.
        """
        i = list(self.hosts).index(name)
        ends = ((f"{self.tag}v{i}", ()), ("eth0", ("ip", "netns", "exec", self.hosts[name].netns)))
        if delay_ms > 0:
            qdisc = [
                "netem",
                "delay",
                f"{delay_ms}ms",
                *(["rate", f"{rate_mbit}mbit"] if rate_mbit > 0 else []),
            ]
        elif rate_mbit > 0:
            # Bucket: 10 ms at the line rate, at least 64 KiB so one jumbo burst still passes.
            burst = max(65536, int(rate_mbit * 1e6 / 8 / 100))
            qdisc = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]
        else:
            qdisc = []
        # The root-side end shapes traffic towards the host, the host's eth0 traffic from it.
        for dev, prefix in ends:
            if qdisc:
                _run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *qdisc])
            else:
                with contextlib.suppress(NetnsError):  # no qdisc of ours there: nothing to lift
                    _run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"])

    def set_link(self, name: str, up: bool) -> None:
        """Cut host `name` off the network (`up=False`) or plug it back in.

        The bridge-side end goes down, so the host's own interface stays configured and its
        processes see a silent network (no resets), as with a pulled cable or a dead switch.
        """
        i = list(self.hosts).index(name)
        _ip("link", "set", f"{self.tag}v{i}", "up" if up else "down")

    def close(self) -> None:
        """Stop processes started with popen(), then delete every namespace and link. Idempotent."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        self.procs.clear()
        errors = []
        while self._made:
            undo = self._made.pop()
            try:
                _run(undo)
            except NetnsError as exc:
                if "Cannot find device" not in str(exc):  # already gone with its peer
                    errors.append(str(exc))
        if errors:
            raise NetnsError("could not remove every namespace and link: " + "; ".join(errors))


def _bridged_frames_reach_iptables() -> bool:
    try:
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
            return f.read().strip() == "1"
    except OSError:  # br_netfilter not loaded: bridged frames skip iptables
        return False


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed: {exc}") from None
    if proc.returncode != 0:
        hint = ""
        if "qdisc kind is unknown" in proc.stderr:
            hint = " (this kernel lacks that qdisc; netem is needed for delay_ms)"
        raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}{hint}")
