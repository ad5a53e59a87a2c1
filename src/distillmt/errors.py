"""The one exception type that reaches the user as a one-line message (the CLI prints it without a traceback)."""


class DistillmtError(Exception):
    """A problem the user can fix: bad input file, bad config value, unreachable hub, stale cache."""
