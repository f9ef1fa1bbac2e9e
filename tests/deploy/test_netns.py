"""cluster/netns.py on real namespaces: hosts reach each other, and nothing outlives close()."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from canopy.cluster import netns

# A one-shot TCP server: prints "ready" once listening, then echoes one line back.
ECHO = """
import socket, sys
s = socket.create_server((sys.argv[1], 7000))
print("ready", flush=True)
c, _ = s.accept()
c.sendall(c.recv(100))
"""
# Receives SINK_BYTES on one connection; prints the seconds from its first byte to its last.
SINK = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 7001))
print("ready", flush=True)
c, _ = s.accept()
got, t0 = len(c.recv(1 << 16)), time.monotonic()
while got < int(sys.argv[2]):
    got += len(c.recv(1 << 16))
print(time.monotonic() - t0, flush=True)
"""
SEND = """
import socket, sys
socket.create_connection((sys.argv[1], 7001), timeout=10).sendall(bytes(int(sys.argv[2])))
"""
SINK_BYTES = 2_000_000
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=5)
c.sendall(b"hello")
print(c.recv(100).decode())
"""


@pytest.fixture(autouse=True)
def namespaces_available() -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def leftovers(tag: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, timeout=10).stdout
    return [line for line in (names + links).splitlines() if tag in line]


@pytest.fixture
def pair() -> Iterator[netns.Network]:
    with netns.Network(["a", "b"], rate_mbit=100) as net:
        yield net
    assert leftovers(net.tag) == []


def test_hosts_have_their_own_address_and_name_and_reach_each_other(pair: netns.Network) -> None:
    a, b = pair["a"], pair["b"]
    assert (a.address, b.address) == ("10.77.0.1", "10.77.0.2")
    assert a.run(["hostname"]).stdout.strip() == a.netns
    server = a.popen([sys.executable, "-c", ECHO, a.address], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    reply = b.run([sys.executable, "-c", CLIENT, a.address], timeout=30)
    assert reply.stdout.strip() == "hello", reply.stderr
    assert server.wait(timeout=10) == 0


def test_two_networks_with_the_same_subnet_coexist_apart(pair: netns.Network) -> None:
    with netns.Network(["a"]) as other:
        assert other.tag != pair.tag and other["a"].address == pair["a"].address
        # The same address in another network is another host: nothing listens there.
        probe = other["a"].run([sys.executable, "-c", CLIENT, pair["b"].address], timeout=30)
        assert probe.returncode != 0


def test_close_stops_what_popen_started() -> None:
    with netns.Network(["a"]) as net:
        proc = net["a"].popen(["sleep", "60"])
    assert proc.poll() is not None
    assert leftovers(net.tag) == []


def test_a_build_that_fails_halfway_removes_what_it_made() -> None:
    net = netns.Network(["a", "b"])
    subprocess.run(["ip", "netns", "add", net["b"].netns], check=True, timeout=10)  # b's name is taken
    try:
        with pytest.raises(netns.NetnsError, match="netns add"):
            net.create()
        assert leftovers(net.tag) == [net["b"].netns]  # only the one this test made
    finally:
        subprocess.run(["ip", "netns", "del", net["b"].netns], timeout=10)


def transfer_s(net: netns.Network) -> float:
    """Seconds to move SINK_BYTES from host b to host a."""
    a, b = net["a"], net["b"]
    sink = a.popen(
        [sys.executable, "-c", SINK, a.address, str(SINK_BYTES)], stdout=subprocess.PIPE, text=True
    )
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    sent = b.run([sys.executable, "-c", SEND, a.address, str(SINK_BYTES)], timeout=60)
    assert sent.returncode == 0, sent.stderr
    seconds = float(sink.stdout.readline())
    assert sink.wait(timeout=10) == 0
    return seconds


def test_a_rate_limit_on_one_link_slows_it_and_lifting_it_restores_speed() -> None:
    with netns.Network(["a", "b"]) as net:
        net.shape("a", rate_mbit=16)  # 2 MB/s into a: ~1 s for 2 MB
        limited = transfer_s(net)
        net.shape("a")
        free = transfer_s(net)
    assert limited >= 0.6, f"2 MB took {limited:.2f}s through a 16 Mbit/s link"
    assert free < limited / 2, f"unlimited {free:.2f}s vs limited {limited:.2f}s"


def test_a_forward_policy_of_drop_gets_one_accept_rule_per_bridge_removed_on_close() -> None:
    # What a Docker engine leaves behind: bridged frames through iptables, FORWARD dropping.
    if not netns._bridged_frames_reach_iptables():
        pytest.skip("bridged frames skip iptables here (br_netfilter not loaded): nothing to let through")

    def rules(bridge: str) -> list[str]:
        out = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, timeout=10)
        return [line for line in out.stdout.splitlines() if bridge in line]

    net = netns.Network(["a"])
    with net:
        assert rules(net.bridge) == [f"-A FORWARD -i {net.bridge} -o {net.bridge} -j ACCEPT"]
    assert rules(net.bridge) == []
