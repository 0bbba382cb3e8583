"""One error type for bad input, and the entry-point wrapper that turns it into one clear line."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class AdaptlabError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def fail(message: str) -> NoReturn:
    raise AdaptlabError(message)


def cli_entry(func: F) -> F:
    """Run a script's main(): user errors become ``error: <message>`` on stderr and exit 2; a full
    disk exits 1 with one line too; Ctrl-C exits 130 after the callee's cleanup (atomic writers
    remove their temp output)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except AdaptlabError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" writing {err.filename}" if err.filename else ""
            print(f"error: disk full{where} ({err.strerror}); nothing was published: free space and run again",
                  file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as err:  # Ctrl-C, or a reason (stages/core/outputs.py: the run's dvc died)
            reason = f" ({err})" if str(err) else ""
            print(f"error: interrupted{reason}; completed work is checkpointed, run again to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
