"""Run a script, pausing at a chosen point so a test can interrupt it exactly there.

    python tests/pause_in.py <point> <script> [args...]

point is ``module:attribute`` (``stages.core.evaluation:Evaluator.score``): once that function
has returned for the first time the process prints ``PAUSED`` and sleeps, so the stage is caught
mid-run with its work done but not published. ``stages.core.io:atomic_dir`` pauses inside the
output folder's context, after everything was written to the temporary folder and before the
rename that publishes it.
"""

import contextlib
import functools
import importlib
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pause() -> None:
    """Print PAUSED and sleep. With ADAPTLAB_TEST_PAUSE_ONCE=<file>, only the first process to get
    here pauses, writing its pid to that file (later ones, e.g. a re-run, go on)."""
    once = os.environ.get("ADAPTLAB_TEST_PAUSE_ONCE")
    if once:
        try:
            with open(once, "x") as marker:
                marker.write(str(os.getpid()))
        except FileExistsError:
            return
    print("PAUSED", flush=True)
    # Short naps, not one long sleep: the kernel may deliver the test's SIGINT to any thread of
    # the process (torch's, tqdm's); CPython then only sets a flag, and a main thread inside one
    # 600 s sleep would not look at it before the sleep ends. Between naps it is handled at once.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.05)


def install(point: str) -> None:
    module_name, attribute = point.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    if point == "stages.core.io:atomic_dir":
        @contextlib.contextmanager
        def paused(*args, **kwargs):
            with original(*args, **kwargs) as tmp:
                yield tmp
                pause()
        setattr(owner, name, paused)
        return

    @functools.wraps(original)
    def paused_after(*args, **kwargs):
        result = original(*args, **kwargs)
        pause()
        return result
    setattr(owner, name, paused_after)


if __name__ == "__main__":
    # Ctrl-C as in a terminal, whatever the test process left: a child inherits an ignored SIGINT
    # (DVC's stage runner sets SIG_IGN while a command runs and restores it only when the old
    # handler was not SIG_DFL), and CPython then keeps ignoring it, so the signal would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install(sys.argv[1])
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(str(ROOT / script), run_name="__main__")
