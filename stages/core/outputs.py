"""A run's folders (--output_dir, --results_dir, --work_dir): one writer each, checked before work.

* **One writer**: a run holds an exclusive lock (``flock``) on ``.<folder>.lock`` beside each of
  its folders for as long as it lives; the file names the holder (pid, command, start time). A
  second run on any of the same folders stops at once with one line naming that pid. The kernel
  drops the lock when its holder dies, however it dies, so a killed run never blocks the next one
  (its stale file is simply taken over); a run that ends normally removes the file.
* **Writable**: each folder's parent (where the atomic writers of stages/core/io.py build the
  output) must be a folder this process can write in, and an existing folder must be writable.
* **Room**: the free space of each file system must cover what the run will write there
  (``check_space``), before training rather than at the first save.
* **Stopped with its dvc**: a run started by ``dvc repro`` / ``dvc exp run`` (DVC sets
  ``DVC_STAGE`` in a stage's environment) watches that dvc process; if dvc dies (SIGKILL, a
  crash), the run stops as after Ctrl-C, keeping its checkpoint, instead of training on as an
  orphan whose end would delete the checkpoint a new run is using.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .errors import fail
from .io import _first_missing, _prune

# Locks this process holds: lock path -> [fd, users]. A lock is a process's, so a second claim of a
# folder from the same process (tests build several Trainers in one process) shares it.
_HELD: dict[Path, list[int]] = {}
_STOP_REASON = ""


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: beside it, because the folder itself is replaced on publish
    (and DVC deletes a stage's outputs before running it)."""
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another run (pid unknown)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info['pid']} ({info.get('command', '?')}, since {since})"


def _writable(flag: str, folder: Path) -> None:
    """One line if the run could not write ``folder``: checked before any work."""
    if folder.exists() and not folder.is_dir():
        fail(f"{flag} '{folder}' is not a folder")
    for ancestor in [folder.parent, *folder.parent.parents]:
        if ancestor.exists():
            break
    if not ancestor.is_dir():
        fail(f"{flag} '{folder}' cannot be created: '{ancestor}' is a file, not a folder")
    for place in ([folder] if folder.is_dir() else []) + [ancestor]:
        try:
            with tempfile.TemporaryFile(dir=place):
                pass
        except OSError as err:
            fail(f"{flag} '{folder}' cannot be written: {err.strerror} in '{place}'")


def _lock(flag: str, folder: Path) -> Path:
    path = lock_path(folder).absolute()
    if path in _HELD:
        _HELD[path][1] += 1
        return path
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            fail(f"{flag} '{folder}' is in use by another run: {holder}; wait for it to end or stop it (kill its pid)")
        try:  # a holder that just ended unlinked the file we opened: lock the path's new file instead
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = {"pid": os.getpid(), "started": time.time(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD[path] = [fd, 1]
    return path


def _unlock(path: Path) -> None:
    entry = _HELD.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _HELD[path]
    try:  # unlink while still holding the lock, so no one can lock this file after we let go
        if os.stat(path).st_ino == os.fstat(entry[0]).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    os.close(entry[0])


class RunFolders:
    """The claim of one run on its folders ({flag: folder}); ``release()`` (idempotent) lets go and
    removes the parent folders the claim created, when empty."""

    def __init__(self, folders: Mapping[str, str | Path]):
        self.folders = {flag: Path(folder) for flag, folder in folders.items()}
        self.locks: list[Path] = []
        self.created: list[tuple[Path, Path]] = []
        try:
            for flag, folder in self.folders.items():
                _writable(flag, folder)
            for flag, folder in self.folders.items():
                top = _first_missing(folder.parent)
                try:
                    folder.parent.mkdir(parents=True, exist_ok=True)
                    if top is not None:
                        self.created.append((folder.parent, top))
                    self.locks.append(_lock(flag, folder))
                except OSError as err:
                    fail(f"{flag} '{folder}' cannot be written: {err.strerror} ({err.filename})")
        except BaseException:
            self.release()
            raise
        watch_dvc()

    def release(self) -> None:
        for path in self.locks:
            _unlock(path)
        self.locks = []
        for parent, top in self.created:
            _prune(parent, top)
        self.created = []

    def check_space(self, needs: Mapping[str, int]) -> None:
        """One line if a file system has less free space than the run will write there:
        ``needs`` maps a flag of ``folders`` to the bytes written under it."""
        by_device: dict[int, list] = {}
        for flag, size in needs.items():
            folder = self.folders[flag]
            place = folder if folder.exists() else folder.parent
            entry = by_device.setdefault(os.stat(place).st_dev, [place, 0, []])
            entry[1] += size
            entry[2].append(f"{flag} {folder}")
        for place, size, where in by_device.values():
            free = shutil.disk_usage(place).free
            if free < size:
                fail(f"not enough disk space for this run: {_size(free)} free where {', '.join(where)} live, "
                     f"the run writes up to about {_size(size)} there; free space or point them elsewhere")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# ----------------------------------------------------------------------------- the dvc that started us

def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:  # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def dvc_process() -> int | None:
    """The dvc process that runs this stage: the parent (bash execs a stage's command) or the
    parent's parent (a shell that does not, such as dash), else None."""
    pid = os.getppid()
    for _ in range(3):
        argv = _argv(pid)
        if any(Path(arg).name == "dvc" for arg in argv) or ("-m" in argv[1:3] and "dvc" in argv[1:3]):
            return pid
        pid = _parent(pid)
        if pid <= 1:
            break
    return None


def _stop_on_sigint(signum, frame):
    raise KeyboardInterrupt(_STOP_REASON)


_WATCHED: list[int] = []


def watch_dvc() -> None:
    """Under DVC, stop this process (as Ctrl-C would: checkpoint kept, temporary output removed)
    once the dvc process that started it has died, however it died."""
    if "DVC_STAGE" not in os.environ or _WATCHED or threading.current_thread() is not threading.main_thread():
        return
    pid = dvc_process()
    if pid is None:
        return
    try:
        pidfd = os.pidfd_open(pid)  # refers to that very process, even if its pid is reused later
    except (OSError, AttributeError):
        return
    _WATCHED.append(pid)
    signal.signal(signal.SIGINT, _stop_on_sigint)

    def wait() -> None:
        global _STOP_REASON
        select.select([pidfd], [], [])
        _STOP_REASON = f"dvc (pid {pid}), which started this run, has exited"
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=wait, name="watch-dvc", daemon=True).start()
