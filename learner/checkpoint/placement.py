"""Where each checkpoint chunk lives: R replicas on Redis shards of distinct hosts.

Data flow: config (`checkpoint.shard_hosts`, `checkpoint.replicas`) -> `make_plan` ->
the writer asks `shards_for(chunk)` before sending a chunk; the manifest records the
answer, so readers never recompute it. The plan is deterministic: the same shards, hosts,
learner and R always give the same placement.

Strategies, over the distinct hosts h0..h(N-1) (Gemini, SOSP'23, section 4):
- ring: chunk sets {h_i, ..., h_(i+R-1)} for every i. N different replica sets.
- group: hosts split into groups of R; each chunk set is one whole group. When R does
  not divide N the last group takes the leftover hosts and uses ring inside it (Gemini's
  "mixed" placement). Fewer distinct replica sets -> fewer R-host failures lose data.
`auto` picks whichever has the lower probability that R simultaneous random host
failures destroy every replica of some chunk (ties go to group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Which shards hold each chunk of this learner's checkpoints, and why (`describe`)."""

    strategy: str
    replicas: int
    shard_hosts: tuple[str, ...]  # host label of each shard, by shard index
    sets: tuple[tuple[str, ...], ...]  # replica sets, as host labels
    loss_probability: dict[str, float]  # strategy -> P(some chunk loses every replica)
    learner_host: str
    learner: int
    warning: str = ""

    def shards_for(self, chunk: int) -> list[int]:
        """The shard indices holding `chunk` (one per host of its replica set)."""
        hosts = self.sets[(chunk + self.learner) % len(self.sets)]
        out = []
        for h in hosts:
            on_host = [i for i, sh in enumerate(self.shard_hosts) if sh == h and i not in out]
            out.append(on_host[(chunk // len(self.sets)) % len(on_host)])
        return out

    def describe(self, chunks: int = 8) -> str:
        """The plan for people: strategy, loss odds, shards, sets, and the first `chunks` placements."""
        lines = [
            f"strategy {self.strategy}, R={self.replicas}, learner {self.learner} on host "
            f"{self.learner_host or '-'}",
            "P(R random host failures lose some chunk): "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.loss_probability.items())),
            "shards: " + ", ".join(f"{i}@{h}" for i, h in enumerate(self.shard_hosts)),
            "replica sets: " + "  ".join("{" + ",".join(s) + "}" for s in self.sets),
        ]
        if self.warning:
            lines.append(f"warning: {self.warning}")
        for c in range(chunks):
            shards = self.shards_for(c)
            lines.append(f"  chunk {c:>3} -> shards {shards} (hosts {[self.shard_hosts[s] for s in shards]})")
        return "\n".join(lines)


def ring_sets(hosts: list[str], r: int) -> list[tuple[str, ...]]:
    """Every run of `r` consecutive hosts around the ring (one set when there are only `r`)."""
    n = len(hosts)
    if n == r:
        return [tuple(hosts)]
    return [tuple(hosts[(i + k) % n] for k in range(r)) for i in range(n)]


def group_sets(hosts: list[str], r: int) -> list[tuple[str, ...]]:
    """Disjoint groups of `r` hosts; leftovers join the last group, which uses ring inside."""
    n = len(hosts)
    groups = [hosts[i : i + r] for i in range(0, n - n % r, r)]
    if n % r:
        groups[-1] = groups[-1] + hosts[n - n % r :]  # leftovers join the last group
    sets: list[tuple[str, ...]] = []
    for g in groups:
        sets += [tuple(g)] if len(g) == r else ring_sets(g, r)
    return sets


def loss_probability(sets: list[tuple[str, ...]], n_hosts: int, r: int) -> float:
    """P(some replica set is wholly inside R hosts failed at random): distinct sets / C(N, R)."""
    return len({frozenset(s) for s in sets}) / math.comb(n_hosts, r)


def make_plan(
    shard_hosts: list[str], replicas: int, learner_host: str = "", learner: int = 0, strategy: str = "auto"
) -> Plan:
    """Build the placement plan; never puts a chunk only on `learner_host` when another host exists.

    Example:
        plan = make_plan(["a", "a", "b", "c", "d"], replicas=2, learner_host="a")
        plan.shards_for(0)  # e.g. [0, 2]: host a and host b
    """
    if not shard_hosts:
        raise ValueError("a checkpoint plan needs at least one Redis shard")
    if strategy not in ("auto", "group", "ring"):
        raise ValueError(f"checkpoint placement {strategy!r} is not one of auto, group, ring")
    hosts = list(dict.fromkeys(shard_hosts))
    r = min(replicas, len(hosts))
    warning = ""
    if r < replicas:
        warning = (
            f"only {len(hosts)} distinct host(s) for R={replicas}: each chunk gets {r} cop"
            f"{'y' if r == 1 else 'ies'}; add shards on other hosts to reach R"
        )
    if r == 1 and len(hosts) > 1 and learner_host in hosts:
        hosts.remove(learner_host)  # a single copy must not sit on the learner's own host
        hosts.append(learner_host)
        candidates = {"ring": [(h,) for h in hosts[:-1]], "group": [(h,) for h in hosts[:-1]]}
    else:
        candidates = {"ring": ring_sets(hosts, r), "group": group_sets(hosts, r)}
    if len(hosts) == 1 and hosts[0] == learner_host:
        warning = (warning + "; " if warning else "") + "every copy is on the learner's own host"
    probs = {k: loss_probability(v, len(hosts), r) for k, v in candidates.items()}
    chosen = strategy
    if strategy == "auto":
        chosen = "group" if probs["group"] <= probs["ring"] else "ring"
    return Plan(
        strategy=chosen,
        replicas=r,
        shard_hosts=tuple(shard_hosts),
        sets=tuple(candidates[chosen]),
        loss_probability=probs,
        learner_host=learner_host,
        learner=learner,
        warning=warning,
    )


def shard_hosts_of(configured: list[str], addresses: list[str]) -> list[str]:
    """Host label per shard: the configured labels, else one pretend host per shard.

    A local run has every shard on 127.0.0.1; treating each as its own host keeps R=2
    meaningful there (it survives a shard process dying, not the machine).
    """
    if configured:
        if len(configured) != len(addresses):
            raise ValueError(
                f"checkpoint.shard_hosts lists {len(configured)} hosts for {len(addresses)} Redis shards"
            )
        return list(configured)
    return [f"shard{i}" for i in range(len(addresses))]
