"""The launcher's restart policy (cluster/supervisor.py `heal`): a role that ran is restarted at
once (a cold restart of every learner waits for nothing), one that keeps dying right after its
restart waits a doubling backoff; every death is announced in the events stream."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
from conftest import RedisServer, wait_for

from canopy.cluster.supervisor import Child, Supervisor
from canopy.config import Config
from canopy.keys import Keys

BACKOFF_S = 0.5


class Sleepers(Supervisor):
    """A supervisor whose children are `sleep` processes: what `heal` does with them is the test."""

    def spawn(
        self, role: str, ident: int, endpoints: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Child:
        child = Child(
            role, ident, subprocess.Popen(["sleep", "60"]), self.run_dir / "log", endpoints or {}, args
        )
        self.children.append(child)
        return child


def kill(child: Child) -> None:
    child.proc.kill()
    child.proc.wait(timeout=10)


def test_a_role_that_ran_is_restarted_at_once_and_one_that_keeps_dying_waits_longer_each_time(
    redis_server: RedisServer, redis_client: redis.Redis, run_keys: Keys, tmp_path: Path
) -> None:
    cfg = Config()
    cfg.run.name = run_keys.run
    cfg.cluster = redis_server.cluster_config()
    cfg.checkpoint.restart_backoff_s = BACKOFF_S
    sup = Sleepers(cfg, tmp_path, tmp_path / "config.toml", run_keys)
    try:
        first = sup.spawn("learner", 0)
        kill(first)
        sup.heal()
        (second,) = sup.role("learner")
        assert second is not first and second.proc.poll() is None  # no wait after a stable run

        kill(second)  # again, right after its restart: a crash loop
        sup.heal()
        assert sup.role("learner") == [second]
        t = time.monotonic()
        wait_for(lambda: sup.heal() or sup.role("learner") != [second], 10, 0.01, "the second restart")
        assert time.monotonic() - t >= BACKOFF_S - 0.1
        (third,) = sup.role("learner")
        kill(third)
        sup.heal()

        died = [
            fields[b"restart_in_s"]
            for _, fields in redis_client.xrange(run_keys.events)
            if fields[b"kind"] == b"role_died"
        ]
        assert died == [b"0.0", str(BACKOFF_S).encode(), str(2 * BACKOFF_S).encode()]
    finally:
        for child in sup.children:
            kill(child)
