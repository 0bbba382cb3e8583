"""Pause every Python process of a test's command tree at a named function (tests/pause_in.py),
for commands the test cannot wrap itself, such as the stages `dvc exp run` starts.

With ADAPTLAB_TEST_PAUSE=module:attribute and this folder on PYTHONPATH, the hook is installed when
that module is first imported (so processes that never import it, dvc's own included, pay nothing):
the process prints PAUSED once the function has returned and sleeps, so a test can signal it in
a known state instead of racing it.
"""

import importlib.abc
import importlib.util
import os
import sys

POINT = os.environ.get("ADAPTLAB_TEST_PAUSE")


class _PauseOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, point: str):
        self.point = point
        self.module = point.split(":")[0]

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
            from pause_in import install

            install(self.point)

        spec.loader.exec_module = exec_module
        return spec


if POINT:
    sys.meta_path.insert(0, _PauseOnImport(POINT))
