"""The small error hierarchy every role raises; the CLI turns `UserError` into one line."""


class CanopyError(Exception):
    """Base of every error canopy raises on purpose."""


class UserError(CanopyError):
    """Something the user can fix: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """The config tree has unknown keys or bad values; `problems` lists every one."""

    def __init__(self, problems: list[str]):
        # One line each, whatever a key or value a user typed holds.
        self.problems = [" ".join(p.splitlines()) for p in problems]
        super().__init__("; ".join(problems))


class ProtocolError(CanopyError):
    """Bytes from a socket or from Redis did not match the schema; the peer gets an error reply."""


class DeadlineExceeded(CanopyError):
    """A blocking call ran past its `timeout=`."""
