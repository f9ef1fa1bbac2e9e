"""Policy version ids `(epoch, step)`: the epoch fences restarted learners, the step orders updates.

A version travels as the string `"<epoch>.<step>"` in Redis keys and as one int64
(`epoch << 32 | step`) in replay items, so every transition names the policy that made it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import ProtocolError


@dataclass(frozen=True, order=True)
class Version:
    epoch: int
    step: int

    def __str__(self) -> str:
        return f"{self.epoch}.{self.step}"

    def packed(self) -> int:
        return (self.epoch << 32) | self.step

    @classmethod
    def unpack(cls, value: int) -> Version:
        return cls(int(value) >> 32, int(value) & 0xFFFFFFFF)

    @classmethod
    def parse(cls, text: str | bytes) -> Version:
        """Parse `"<epoch>.<step>"`, raising ProtocolError on anything else."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        epoch, sep, step = text.partition(".")
        if not sep or not epoch.isdigit() or not step.isdigit() or len(text) > 32:
            raise ProtocolError(f"bad version id {text[:40]!r}: expected '<epoch>.<step>'")
        return cls(int(epoch), int(step))


NO_VERSION = Version(0, 0)
