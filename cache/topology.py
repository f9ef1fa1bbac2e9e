"""Topology planner: the fan-out and depth of the cache tree, from hosts, sizes and links.

Decides the shape of the model data flow learner -> Redis root -> nodes -> actors before
anything starts; `canopy up`, `canopy cache plan` and every cache node (`cache.fanout = 0`)
use it. There is one leaf node per host, which hands each version to that host's actors
through shared memory (one copy, only notifications cross sockets), so the number of
actors per host does not change the tree: it adds one memory copy and a notification.

Cost model (seconds from publish to "every leaf has the version"). A node forwards chunk i
to its children while chunk i+1 is still arriving (cut-through), so a version of S bytes
in C-byte chunks crosses a tree of depth d and fan-out f as a pipeline:

    hop      = latency + hop_overhead + f * C / egress     first chunk through one tier
    T_tree   = d * hop + (S / C - 1) * f * C / egress       fill the pipe, then stream
    T_total  = T_tree + S / memcpy + notify                  + the host-local hand-over

`egress` is a node's outgoing bandwidth, min(per-node egress, link bandwidth), shared by
its f children; the Redis root uses its own egress. The trade-off: a wider tree is
shallower (fewer hops) but each node streams f copies through one NIC; with cut-through
the streaming term dominates for models of many chunks, so larger models want narrower,
deeper trees. Candidates are d = 1..MAX_DEPTH with the smallest f that reaches every host
(f ** d >= hosts); the cheapest wins, ties going to the shallower tree.

Nodes are numbered breadth-first (`parents_of`): nodes 0..f-1 hang under Redis, node i >= f
under node (i - f) // f. Every node keeps its grandparents and the Redis root as fallback
parents (see cache/upstream.py).
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from canopy.config import Config

MAX_DEPTH = 8
CHUNK_BYTES = 1 << 20  # as cache/blob.py cuts versions


@dataclass(frozen=True)
class Inputs:
    """What the planner needs to know; bandwidths in bytes/s, times in seconds."""

    hosts: int
    actors_per_host: int
    model_bytes: int
    link_bytes_s: float = 1.25e9  # 10 Gbit/s between hosts
    node_egress_bytes_s: float = 0.0  # a node's outgoing bandwidth; 0 = the link's
    root_egress_bytes_s: float = 0.0  # the Redis root's; 0 = a node's
    latency_s: float = 100e-6  # one network hop
    hop_overhead_s: float = 1e-3  # a node's own time per chunk (digest check, Python)
    memcpy_bytes_s: float = 5e9  # the host-local copy into shared memory
    notify_s: float = 20e-6  # per actor on a host: one notification read and a policy built
    chunk_bytes: int = CHUNK_BYTES
    fanout: int = 0  # force this fan-out (cache.fanout); 0 = choose

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.model_bytes < 1 or self.actors_per_host < 0:
            raise ValueError("planner inputs: hosts and model bytes must be >= 1, actors per host >= 0")
        if min(self.link_bytes_s, self.chunk_bytes) <= 0 or self.fanout < 0:
            raise ValueError("planner inputs: link bandwidth and chunk size must be > 0, fanout >= 0")
        if self.fanout == 1 and self.hosts > 1:
            raise ValueError(f"fanout 1 cannot reach {self.hosts} hosts: use 0 (planner) or >= 2")

    @property
    def egress(self) -> float:
        """A node's outgoing bandwidth: its own, capped by the link."""
        return min(self.node_egress_bytes_s or self.link_bytes_s, self.link_bytes_s)

    @property
    def root_egress(self) -> float:
        """The Redis root's outgoing bandwidth (a node's when unset), capped by the link."""
        return min(self.root_egress_bytes_s or self.egress, self.link_bytes_s)


@dataclass(frozen=True)
class Plan:
    """The chosen tree and its predicted times."""

    fanout: int  # children per node (the Redis root included)
    depth: int  # node tiers between Redis and the actors (1: leaves hang under Redis)
    tiers: list[int]  # nodes per tier, top first; the last tier holds one leaf per host
    root_egress_bytes: int  # what the Redis root sends per version
    tree_s: float  # predicted time until every leaf holds the version
    total_s: float  # ... until every actor can act with it
    inputs: Inputs

    def to_dict(self) -> dict:
        """The plan as JSON-ready data, inputs nested (`canopy cache plan --json`)."""
        return {k: v for k, v in asdict(self).items() if k != "inputs"} | {"inputs": asdict(self.inputs)}

    def describe(self) -> str:
        """The plan in a few lines, for people."""
        i = self.inputs
        lines = [
            f"{i.hosts} hosts x {i.actors_per_host} actors, model {i.model_bytes / 2**20:.1f} MiB in "
            f"{math.ceil(i.model_bytes / i.chunk_bytes)} chunks, links {i.link_bytes_s * 8 / 1e9:g} Gbit/s",
            f"fan-out {self.fanout}, depth {self.depth}: Redis -> "
            + " -> ".join(f"{n} node{'s' * (n != 1)}" for n in self.tiers)
            + f" -> actors (shm, {i.actors_per_host} per host)",
            f"Redis root sends {self.root_egress_bytes / 2**20:.1f} MiB per version",
            f"predicted: every leaf holds it in {self.tree_s * 1e3:.1f} ms, "
            f"every actor can act with it in {self.total_s * 1e3:.1f} ms",
        ]
        return "\n".join(lines)


def tiers_of(hosts: int, fanout: int) -> list[int]:
    """Nodes per tier, top first, for `hosts` leaves under a tree of this fan-out."""
    tiers = [hosts]
    while tiers[0] > fanout:
        tiers.insert(0, math.ceil(tiers[0] / fanout))
    return tiers


def cost(inputs: Inputs, fanout: int) -> tuple[float, list[int]]:
    """Predicted seconds until every leaf holds a version, and the tiers, for this fan-out."""
    tiers = tiers_of(inputs.hosts, fanout)
    chunks = math.ceil(inputs.model_bytes / inputs.chunk_bytes)
    chunk = inputs.model_bytes / chunks
    # Children served by each tier's senders: Redis feeds tier 0, tier k feeds tier k+1.
    per_sender = [
        (tiers[0], inputs.root_egress),
        *((math.ceil(b / a), inputs.egress) for a, b in itertools.pairwise(tiers)),
    ]
    fill = sum(inputs.latency_s + inputs.hop_overhead_s + f * chunk / bw for f, bw in per_sender)
    stream = (chunks - 1) * max(f * chunk / bw for f, bw in per_sender)
    return fill + stream, tiers


def plan(inputs: Inputs) -> Plan:
    """The cheapest tree under the cost model of the module docstring."""
    if inputs.fanout:
        candidates = [inputs.fanout]
    else:
        # The smallest fan-out reaching every host at each depth (f ** d >= hosts).
        candidates = sorted({max(1, _root(inputs.hosts, d)) for d in range(1, MAX_DEPTH + 1)}, reverse=True)
    best: tuple[float, int, int, list[int]] | None = None
    for f in candidates:
        tree_s, tiers = cost(inputs, f)
        if best is None or tree_s < best[0] * (1 - 1e-9):
            best = (tree_s, len(tiers), f, tiers)
    assert best is not None
    tree_s, depth, fanout, tiers = best
    host_s = inputs.model_bytes / inputs.memcpy_bytes_s + inputs.actors_per_host * inputs.notify_s
    return Plan(fanout, depth, tiers, tiers[0] * inputs.model_bytes, tree_s, tree_s + host_s, inputs)


def parents_of(node: int, fanout: int) -> list[int]:
    """Node ids from `node`'s parent up to the top tier (empty: it hangs under Redis).

    Breadth-first numbering: nodes 0..fanout-1 under Redis, node i >= fanout under
    (i - fanout) // fanout. The caller appends the Redis root as the last fallback.
    """
    if fanout < 1:
        raise ValueError(f"fanout must be >= 1, got {fanout}")
    chain = []
    while node >= fanout:
        node = (node - fanout) // fanout
        chain.append(node)
    return chain


def _root(n: int, d: int) -> int:
    """The smallest integer f with f ** d >= n."""
    f = max(1, round(n ** (1 / d)))
    while f**d < n:
        f += 1
    while f > 1 and (f - 1) ** d >= n:
        f -= 1
    return f


def for_config(cfg: Config) -> Plan:
    """The plan `canopy up` and every node follow: each of `cache.nodes` nodes is a leaf
    serving its share of the actors, on local links. The model size is estimated from
    `learner.hidden` (the env's input and output layers are small next to the hidden ones)."""
    hidden = cfg.learner.hidden
    params = sum(a * b + b for a, b in itertools.pairwise(hidden)) + 64 * (hidden[0] + hidden[-1])
    return plan(
        Inputs(
            hosts=max(1, cfg.cache.nodes),
            actors_per_host=math.ceil(cfg.actors.count / max(1, cfg.cache.nodes)),
            model_bytes=4 * params,
            fanout=cfg.cache.fanout,
        )
    )


def add_plan_parser(sub: argparse._SubParsersAction, func: Callable) -> None:
    """`canopy cache plan`: its flags, in the units people think in."""
    p = sub.add_parser("plan", help="fan-out and depth of the cache tree, with the predicted times")
    p.add_argument("--hosts", type=int, required=True, help="hosts with actors (one leaf node each)")
    p.add_argument("--actors", type=int, required=True, help="actors in all")
    p.add_argument("--model-mb", type=float, required=True, help="size of one version on the wire")
    p.add_argument("--link-gbit", type=float, default=10.0, help="link bandwidth between hosts")
    p.add_argument("--egress-gbit", type=float, default=0.0, help="a node's egress (default: the link)")
    p.add_argument("--root-egress-gbit", type=float, default=0.0, help="the Redis root's egress")
    p.add_argument("--latency-ms", type=float, default=0.1, help="one network hop")
    p.add_argument("--fanout", type=int, default=0, help="force a fan-out (0: choose)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=func)


def from_cli(args: argparse.Namespace) -> Inputs:
    """Planner inputs from `canopy cache plan`'s flags, converted to bytes/s and seconds."""
    gbit = 1e9 / 8
    return Inputs(
        hosts=args.hosts,
        actors_per_host=math.ceil(args.actors / max(1, args.hosts)),
        model_bytes=max(1, int(args.model_mb * 2**20)),
        link_bytes_s=args.link_gbit * gbit,
        node_egress_bytes_s=args.egress_gbit * gbit,
        root_egress_bytes_s=args.root_egress_gbit * gbit,
        latency_s=args.latency_ms / 1e3,
        fanout=args.fanout,
    )
