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


class DataUnavailable(Exception):
    """The data cannot be read now, though nothing is wrong with the input: a remote store
    that kept failing after retries (an outage, a network partition).

    A loader raises it at the same batch on every process, before yielding that batch. The
    trainer then stops as after a preemption (it saves the last completed step, skips the
    final validation, ``fit`` returns) and records the message in ``Trainer.data_error``;
    ``aurora-train`` exits with status 75 (retry later), and rerunning it resumes.
    """
