"""User-facing errors: one clear line naming the problem and the fix, exit status 2."""

from __future__ import annotations

import sys


class UsageError(Exception):
    """Bad input from the user (flags, config, data, checkpoints).

    The message is one line that names the problem and the fix; the CLI prints it without a
    traceback and exits with status 2.
    """


def report_usage_error(err: UsageError, prog: str) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2
