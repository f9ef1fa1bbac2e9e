"""Policy version ids `(epoch, step)`: the epoch fences restarted learners, the step orders updates.

A version travels as the string `"<epoch>.<step>"` in Redis keys and as one int64
(`epoch << 32 | step`) in replay items, so every transition names the policy that made it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from canopy.errors import ProtocolError

_VERSION_RE = re.compile(r"(\d{1,10})\.(\d{1,10})", re.ASCII)


@dataclass(frozen=True, order=True)
class Version:
    """A policy version; orders by epoch, then step."""

    epoch: int
    step: int

    def __str__(self) -> str:
        return f"{self.epoch}.{self.step}"

    def packed(self) -> int:
        """The int64 form replay items carry: `epoch << 32 | step`."""
        return (self.epoch << 32) | self.step

    @classmethod
    def unpack(cls, value: int) -> Version:
        """The version of a `packed` int."""
        return cls(int(value) >> 32, int(value) & 0xFFFFFFFF)

    @classmethod
    def parse(cls, text: str | bytes) -> Version:
        """Parse `"<epoch>.<step>"`, raising ProtocolError on anything else."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        match = _VERSION_RE.fullmatch(text)
        if match is None or int(match[1]) >= 2**31 or int(match[2]) >= 2**32:
            raise ProtocolError(f"bad version id {text[:40]!r}: expected '<epoch>.<step>'")
        return cls(int(match[1]), int(match[2]))


NO_VERSION = Version(0, 0)
