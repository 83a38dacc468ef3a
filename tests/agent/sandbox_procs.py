"""Process bookkeeping for the sandbox tests: no test may leave a process of a sandbox behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator

PR_SET_CHILD_SUBREAPER = 36


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (a killed orphan waits for the subreaper below to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def no_leftover_processes() -> Iterator[None]:
    """Orphans of the sandboxes are re-parented to this process; after the test none may be left."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
        deadline = time.monotonic() + 5
        while True:
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:  # reap zombies re-parented to us
                    pass
            except ChildProcessError:
                pass
            left = descendants(os.getpid())
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not left, f"processes left behind: {left}"
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
