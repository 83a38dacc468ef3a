"""A code sandbox for the agent's python tool: model-written code runs in a contained, persistent worker.

Threat model. The code is written by a language model that may be wrong, confused or steered by a prompt
injection (a web page, a document, a tool result). Treat it as hostile: it may try to read secrets (files,
environment variables, other processes), reach the network, write outside its workspace, kill or exhaust
the host (fork bombs, memory, disk, output floods) or attack the process that runs it. It may not escape
the machine's kernel: a kernel exploit is out of scope (see docs/sandbox.md for what is NOT defended).

Layers, outermost first, and why each exists:
  * Namespaces (levels "bubblewrap" and "namespaces"). A user namespace, so that "root" inside means nothing
    outside; a mount namespace whose root is an empty tmpfs holding read-only binds of only what Python needs
    (/usr, the interpreter's prefix, the venv's site-packages; not /root, not the repository, of /etc only
    ld.so.cache), the workspace read-write at /workspace, a private /tmp, a fresh /proc and a minimal /dev; a
    network namespace holding only its own loopback (no route anywhere, not even to the host's 127.0.0.1); a pid
    namespace, so the code sees only its own processes and killing its init kills every process it started;
    ipc and uts namespaces.
  * An unprivileged host uid. When the parent runs as root, the sandboxed code runs as host uid 65534: as uid 0
    it would own every root-owned file that happened to be visible and, worse, RLIMIT_NPROC is never enforced
    for uid 0 (the kernel exempts INIT_USER). Inside its own user namespace the kernel counts RLIMIT_NPROC per
    namespace, which is what contains a fork bomb: fork fails with EAGAIN at max_processes.
  * No privileges: capabilities dropped (bounding set included), no_new_privs, no setuid binaries.
  * A seccomp filter refusing the syscalls that widen the kernel's attack surface and that a contained program
    has no use for: ptrace, mount, unshare/setns/clone with namespace flags, bpf, keyctl, perf, io_uring, ...
  * Resource limits in the worker (RLIMIT_CPU, _AS, _FSIZE, _NPROC, _NOFILE, _CORE), a size-limited /tmp.
  * From the outside: a wall-clock timeout per call (the parent kills the whole pid namespace), output caps
    enforced while reading (a worker writing gigabytes cannot grow the parent), a JSON-lines protocol (never
    pickle: the parent parses untrusted bytes only as JSON), a clean environment (no secrets inherited), and
    workspace file access that never follows a symlink out.

Levels, best first, picked automatically (``isolation_level()``) and reported in ``Sandbox.level``:
  * "bubblewrap": bwrap(1) builds the namespaces. Preferred: a small, audited setuid-free tool.
  * "namespaces": the same layout built by util-linux unshare(1) plus the worker itself (mounts, pivot_root).
  * "process": resource limits, seccomp (which also refuses every socket but AF_UNIX) and a clean environment
    only. The code reads whatever the parent's user can read and, as that user, can signal its processes:
    it is NOT isolated. It is used only on an explicit opt-in (``allow_unisolated=True`` or the environment
    variable TINYCHAT_SANDBOX_ALLOW_UNISOLATED=1), and a RuntimeWarning says so; without one, a machine that
    cannot isolate (and a CPU architecture the seccomp filter does not know) is refused with a UserError.

The worker (``_sandbox_worker.py``) is a standard-library-only script run with ``python -I -S -B``; it applies
the inner layers itself (so they hold at every level) and keeps the user's namespace between calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import platform
import select
import selectors
import shutil
import signal
import site
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from tinychat.errors import UserError

__all__ = [
    "ALLOW_UNISOLATED_ENV",
    "LEVELS",
    "Limits",
    "RunResult",
    "Sandbox",
    "available_levels",
    "isolation_level",
    "require_isolation",
    "unisolated_allowed",
]

LEVELS = ("bubblewrap", "namespaces", "process")
ALLOW_UNISOLATED_ENV = "TINYCHAT_SANDBOX_ALLOW_UNISOLATED"
_SECCOMP_ARCHES = ("x86_64", "aarch64")  # the worker's seccomp (and pivot_root) syscall tables
log = logging.getLogger(__name__)
T = TypeVar("T")

_WORKER = Path(__file__).with_name("_sandbox_worker.py")
_INSIDE_UID = 1000  # the uid the code sees inside a namespace level
_HOST_UID = 65534  # the host uid it runs as when the parent is root ("nobody")
_STARTUP_TIMEOUT = 30.0
_MAX_MESSAGE = 1 << 20  # a reply line longer than this is a protocol violation
_SYSTEM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/alternatives",
)
# Every sandbox is forked from this one long-lived thread: the kernel's parent-death signal (bwrap's
# --die-with-parent, the workers' PR_SET_PDEATHSIG) fires when the *thread* that forked exits, and callers such as
# the MCP server run tools in pooled threads that come and go.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")


@dataclass(frozen=True)
class Limits:
    """What one sandbox may use. Memory and CPU limits apply to each of its processes."""

    timeout: float = 30.0  # wall-clock seconds per run(), enforced by the parent: the session is killed
    cpu_seconds: int = 60  # RLIMIT_CPU per process over its life (the session's worker included)
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space per process
    file_size_bytes: int = 64 << 20  # RLIMIT_FSIZE: the largest file it may write
    max_processes: int = 64  # RLIMIT_NPROC: processes and threads, counted inside the sandbox's user namespace
    open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 32 << 10  # stdout and stderr each, per call; the rest is counted and dropped
    tmp_bytes: int = 64 << 20  # size of the private /tmp (and /dev/shm): it lives in memory

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise UserError(f"sandbox limit {name} must be positive, got {value!r}")


@dataclass
class RunResult:
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # traceback text of an exception in the user code, "" if none
    timed_out: bool = False
    duration: float = 0.0
    restarted: bool = False  # the previous session died (limit/timeout): this ran in a fresh one, state lost
    crashed: str = ""  # why the session died during this call, "" if it did not

    def as_text(self) -> str:
        """What the model sees as the tool result."""
        parts = []
        if self.restarted:
            parts.append("[note: the previous session died; this ran in a fresh one: earlier variables are gone]")
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        if self.error:
            parts.append(self.error.rstrip("\n"))
        if self.timed_out:
            parts.append(f"[timed out after {self.duration:.1f} s: the session was killed, its state is lost]")
        elif self.crashed:
            parts.append(f"[the session died: {self.crashed}; its state is lost]")
        return "\n".join(parts) if parts else "[no output]"


def isolation_level() -> str:
    """The strongest level that works on this machine."""
    return available_levels()[0]


def available_levels() -> list[str]:
    """The levels that work on this machine, strongest first ("process" always works)."""
    return [level for level in LEVELS if _available(level)]


def unisolated_allowed(allow: bool | None = None) -> bool:
    """Whether running model-written code without full isolation was opted into: `allow`, else the environment."""
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_UNISOLATED_ENV, "").strip().lower() in ("1", "true", "yes")


def require_isolation(allow_unisolated: bool | None = None) -> str:
    """The level a Sandbox will use here; a UserError if it cannot isolate and that was not opted into."""
    level = isolation_level()
    if not unisolated_allowed(allow_unisolated):
        if level == "process":
            raise UserError(
                "the code sandbox cannot isolate model-written code on this machine (no bubblewrap, no unprivileged "
                "user namespaces): install bubblewrap (apt-get install bubblewrap), or opt in to running it "
                f"unisolated with --allow-unisolated (agent), allow_unisolated=True or {ALLOW_UNISOLATED_ENV}=1."
            )
        if platform.machine() not in _SECCOMP_ARCHES:
            raise _no_seccomp()
    return level


def _no_seccomp() -> UserError:
    return UserError(
        f"the code sandbox has no seccomp filter for the CPU architecture {platform.machine()!r} (only "
        f"{', '.join(_SECCOMP_ARCHES)}): opt in to running model-written code without it with --allow-unisolated "
        f"(agent), allow_unisolated=True or {ALLOW_UNISOLATED_ENV}=1."
    )


@functools.cache
def _available(level: str) -> bool:
    if level == "process":
        return True
    if level == "bubblewrap":
        if not shutil.which("bwrap"):
            return False
        probe = ["bwrap", "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true"]
    else:
        if not shutil.which("unshare") or platform.machine() not in _SECCOMP_ARCHES:
            return False
        as_root = [] if os.geteuid() == 0 else ["--map-root-user"]
        probe = ["unshare", "--user", *as_root, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10, env=_env("/")).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _env(home: str) -> dict[str, str]:
    """The whole environment the code gets: nothing of the parent's (API keys live there)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "USER": "sandbox",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        # one thread per BLAS/OpenMP pool: threads count against max_processes
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _host_paths() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What Python needs, read-only: ([(host source, sandbox path)], [(symlink target, sandbox path)])."""
    binds: list[tuple[str, str]] = []
    links: list[tuple[str, str]] = []
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            links.append((os.readlink(path), path))
        elif os.path.exists(path):
            binds.append((path, path))
    wanted = [(os.path.realpath(sys.executable), sys.executable)]  # the venv's python is a symlink out of it
    wanted += [(p, p) for p in sorted({sys.base_prefix, sys.base_exec_prefix})]
    if sys.prefix != sys.base_prefix:  # a venv: its pyvenv.cfg and site-packages, not its bin/ or the repo
        wanted.append((os.path.join(sys.prefix, "pyvenv.cfg"),) * 2)
        wanted += [(p, p) for p in site.getsitepackages() if _under(p, sys.prefix)]
    for src, dst in sorted(wanted, key=lambda w: len(w[1])):  # folders before the files they hold
        if os.path.exists(src) and not any(_under(dst, b) for _, b in binds):
            binds.append((src, dst))
    return binds, links


def _parents(paths: Iterable[str]) -> list[str]:
    """Every ancestor folder of `paths` below "/", parents first."""
    found = {str(parent) for path in paths for parent in PurePosixPath(path).parents if str(parent) != "/"}
    return sorted(found, key=lambda p: (p.count("/"), p))


class _Capture:
    """Keeps the first `cap` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.cap, self.buf, self.dropped = cap, bytearray(), 0

    def feed(self, data: bytes) -> None:
        room = max(0, self.cap - len(self.buf))
        self.buf += data[:room]
        self.dropped += len(data) - min(room, len(data))

    def text(self) -> str:
        text = self.buf.decode("utf-8", "replace")
        return text + f"\n[... truncated {self.dropped} bytes]\n" if self.dropped else text


class _Session:
    """One live worker: its process, its pipes, and how to kill every process it started."""

    def __init__(self, proc: subprocess.Popen, resp: int) -> None:
        self.proc, self.resp = proc, resp
        self.stdin, self.stdout, self.stderr = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
        for fd in (self.stdin, self.stdout, self.stderr, resp):
            os.set_blocking(fd, False)
        self.pending = b""
        self.init_pid: int | None = None  # host pid of the pid namespace's init
        self.pidfd: int | None = None
        self.pidns: int | None = None
        self.rc: int | None = None  # set once killed

    def watch(self, init_pid: int) -> None:
        self.init_pid = init_pid
        self.pidns = os.stat(f"/proc/{init_pid}/ns/pid").st_ino
        self.pidfd = os.pidfd_open(init_pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exchange(self, payload: bytes, deadline: float, out: _Capture, err: _Capture) -> tuple[dict | None, bool]:
        """Send payload, pump the pipes until a reply line, EOF (died) or the deadline: (reply, timed_out)."""
        todo = memoryview(payload)
        sel = selectors.DefaultSelector()
        for fd in (self.resp, self.stdout, self.stderr):
            sel.register(fd, selectors.EVENT_READ)
        if todo:
            sel.register(self.stdin, selectors.EVENT_WRITE)
        try:
            while True:
                if b"\n" in self.pending:
                    line, self.pending = self.pending.split(b"\n", 1)
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        reply = None
                    # the code can write on our channel too: anything but a JSON object is treated as a crash
                    return (reply if isinstance(reply, dict) else None), False
                if len(self.pending) > _MAX_MESSAGE:
                    return None, False
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, True
                for key, _ in sel.select(left):
                    fd = key.fd
                    if fd == self.stdin:
                        try:
                            todo = todo[os.write(fd, todo[: 1 << 16]) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            todo = todo[:0]
                        if not todo:
                            sel.unregister(fd)
                        continue
                    try:
                        data = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(fd)
                        if fd == self.resp:
                            return None, False
                    elif fd == self.resp:
                        self.pending += data
                    else:
                        (out if fd == self.stdout else err).feed(data)
        finally:
            sel.close()

    def drain(self, out: _Capture, err: _Capture, budget: float = 0.2) -> None:
        """Read what the worker wrote before its reply (it is in the pipes already), without blocking."""
        end = time.monotonic() + budget
        for fd, capture in ((self.stdout, out), (self.stderr, err)):
            while time.monotonic() < end:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:  # EAGAIN: nothing more for now
                    break
                if not data:
                    break
                capture.feed(data)

    def kill(self, grace: float = 0.0, out: _Capture | None = None, err: _Capture | None = None) -> int:
        """Kill every process of the sandbox, wait until they are gone, keep what they wrote last (into out, err),
        close the pipes and return the worker's exit status. Idempotent."""
        if self.rc is not None:
            return self.rc
        if grace:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # the pid namespace dies with its init
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2.0)  # bwrap/unshare reap that init and exit: no zombie is orphaned
        if self.proc.returncode is None or self.pidfd is None:  # bwrap/unshare if still there, or the process
            with contextlib.suppress(ProcessLookupError, PermissionError):  # level's group (its children too)
                os.killpg(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait()
        if self.pidfd is not None:
            select.select([self.pidfd], [], [], 5.0)  # readable once init (and with it the namespace) is gone
            os.close(self.pidfd)
            self.pidfd = None
        if out is not None and err is not None:
            self.drain(out, err, budget=1.0)  # the writers are dead: what is left in the pipes, then EOF
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
        os.close(self.resp)
        self.rc = rc
        return rc

    def pids(self) -> list[int]:
        """Host pids of the sandbox's live (not zombie) processes: its pid namespace, or its process group."""
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] == "Z":
                    continue
                if self.pidns is not None:
                    mine = os.stat(f"/proc/{entry}/ns/pid").st_ino == self.pidns
                else:
                    mine = int(fields[2]) == self.proc.pid
            except (OSError, IndexError, ValueError):
                continue
            if mine:
                found.append(int(entry))
        return found


def _exit_reason(rc: int, limits: Limits) -> str:
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == signal.SIGXCPU:
        return f"CPU time limit reached ({limits.cpu_seconds} s per process)"
    if sig == signal.SIGKILL:
        return "killed (SIGKILL: out of memory, the CPU-time hard limit, or the code killed itself)"
    if sig:
        return f"killed by {signal.Signals(sig).name}"
    return f"the worker exited with status {rc}"


def _write_id_maps(pid: int) -> None:
    """Root parent: inside uid 0 stays host 0 only for the setup, the code itself runs as _INSIDE_UID → _HOST_UID."""
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n{_INSIDE_UID} {_HOST_UID} 1\n")


def _user_tasks(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                count += len(os.listdir(f"/proc/{entry}/task"))
        except OSError:
            pass
    return count


def _wait_for(check: Callable[[], T | None], deadline: float, proc: subprocess.Popen, what: str) -> T:
    """Poll `check` until it returns something truthy; the start failed if the process exits or time runs out."""
    while True:
        value = check()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sandbox failed to start: {what}")
        time.sleep(0.002)


def _child_of(pid: int) -> int | None:
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    return int(entry)
        except (OSError, IndexError, ValueError):
            pass
    return None


class Sandbox:
    """A persistent Python session in a sandbox. ``run`` code, move files with ``put_file``/``get_file``.

    After a timeout or a crash the next ``run`` starts a fresh session and says so (``restarted``). Calls from
    several threads are serialized; use one sandbox per conversation.
    """

    def __init__(
        self,
        workspace: Path,
        limits: Limits | None = None,
        level: str | None = None,
        allow_unisolated: bool | None = None,
    ) -> None:
        """`allow_unisolated`: run at the "process" level, or without seccomp, where nothing better works
        (None: the environment variable TINYCHAT_SANDBOX_ALLOW_UNISOLATED decides); otherwise that is refused."""
        if level is not None and level not in LEVELS:
            raise UserError(f"unknown sandbox level {level!r}: expected one of {', '.join(LEVELS)}")
        if level is not None and not _available(level):
            raise UserError(
                f"sandbox level {level!r} is not available on this machine (the best available is "
                f"{isolation_level()!r}); install bubblewrap or allow unprivileged user namespaces"
            )
        self.allow_unisolated = unisolated_allowed(allow_unisolated)
        candidates = [level] if level else available_levels()
        if not self.allow_unisolated:
            if level == "process":
                raise UserError(
                    f"sandbox level 'process' is not isolated: pass allow_unisolated=True or set "
                    f"{ALLOW_UNISOLATED_ENV}=1 to run model-written code in it."
                )
            require_isolation(False)
            candidates = [c for c in candidates if c != "process"]
        self.limits = limits or Limits()
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.workspace = self.workspace.resolve()
        self.warnings: list[str] = []
        self._root = os.geteuid() == 0
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self._lost = False  # a session died: the next run reports restarted=True
        self._calls = 0
        self._closed = False
        for i, candidate in enumerate(candidates):
            self.level = candidate
            self._owner = (_HOST_UID, _HOST_UID) if self._root and self.level != "process" else None
            if self._owner:
                self._chown_tree()
            if self.level == "process":
                self._warn(
                    "SANDBOX LEVEL 'process' is NOT isolated: only resource limits, seccomp and a clean environment; "
                    "the code can read every file the parent's user can read and signal its processes (as root: "
                    "kill the host's). Install bubblewrap."
                )
            try:
                self._start()
                break
            except RuntimeError as e:  # a level that probes fine can still fail for real: say so, take the next
                if i == len(candidates) - 1:
                    raise
                self._warn(f"sandbox level {self.level!r} failed to start, falling back to {candidates[i + 1]!r}: {e}")

    # ------------------------------------------------------------------ public API

    def run(self, code: str, timeout: float | None = None) -> RunResult:
        """Execute ``code`` in the session's namespace; a last expression's value is printed like a REPL."""
        timeout = self.limits.timeout if timeout is None else timeout
        if not timeout > 0:
            raise UserError(f"sandbox timeout must be positive, got {timeout!r}")
        with self._lock:
            if self._closed:
                raise UserError("this sandbox is closed")
            restarted = False
            if self._session is None or not self._session.alive():
                restarted = self._session is not None or self._lost
                self._stop()
                self._start()
            self._calls += 1
            request = (json.dumps({"id": self._calls, "code": code}) + "\n").encode()
            out, err = _Capture(self.limits.output_bytes), _Capture(self.limits.output_bytes)
            start = time.monotonic()
            session = self._session
            reply, timed_out = session.exchange(request, start + timeout, out, err)
            while reply is not None and reply.get("id") != self._calls:  # a stale line from a forked child
                reply, timed_out = session.exchange(b"", start + timeout, out, err)
            result = RunResult(timed_out=timed_out, restarted=restarted)
            if reply is None:
                rc = session.kill(grace=0.0 if timed_out else 2.0, out=out, err=err)
                self._session, self._lost = None, True
                if not timed_out:
                    result.crashed = _exit_reason(rc, self.limits)
            else:
                session.drain(out, err)
                result.error = str(reply.get("error", ""))
                dropped = reply.get("dropped")
                if isinstance(dropped, list) and len(dropped) == 2 and all(isinstance(n, int) for n in dropped):
                    out.dropped += dropped[0]
                    err.dropped += dropped[1]
            result.duration = time.monotonic() - start
            result.stdout, result.stderr = out.text(), err.text()
            return result

    def put_file(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` in the workspace (subfolders are created; symlinks are never followed)."""
        dir_fd, leaf = self._open_dir(name, create=True)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = self._open_leaf(name, leaf, dir_fd, flags)
        finally:
            os.close(dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._owner:
                os.fchown(fd, *self._owner)
        finally:
            os.close(fd)

    def get_file(self, name: str, max_bytes: int = 256 << 20) -> bytes:
        """Read ``name`` from the workspace; a symlink, a folder or a file over ``max_bytes`` is refused."""
        dir_fd, leaf = self._open_dir(name, create=False)
        try:
            fd = self._open_leaf(name, leaf, dir_fd, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        finally:
            os.close(dir_fd)
        with open(fd, "rb") as f:
            if os.fstat(fd).st_size > max_bytes:
                raise UserError(f"{name!r} in the sandbox workspace is larger than {max_bytes} bytes")
            return f.read(max_bytes + 1)[:max_bytes]

    def host_pids(self) -> list[int]:
        """Host pids of the sandbox's live processes (its whole pid namespace); [] when no session runs."""
        return self._session.pids() if self._session is not None and self._session.alive() else []

    def describe(self) -> str:
        """One paragraph for logs and reports: the level, who the code runs as, the limits, the warnings."""
        who = f"host uid {_HOST_UID}" if self._owner else f"host uid {os.geteuid()}"
        text = f"sandbox level {self.level!r}, code runs as {who}; {self.limits}"
        return text + "".join(f"\nWARNING: {w}" for w in self.warnings)

    def close(self) -> None:
        """Kill every process of the sandbox. Idempotent; the workspace stays."""
        with self._lock:
            self._closed = True
            self._stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown, whatever is left
            if not self._closed:
                self.close()

    # ------------------------------------------------------------------ internals

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _chown_tree(self) -> None:
        os.chown(self.workspace, *self._owner)
        for dirpath, dirnames, filenames in os.walk(self.workspace):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), *self._owner, follow_symlinks=False)

    def _config(self) -> dict:
        lim = self.limits
        nproc = lim.max_processes
        if self.level == "process" and not self._root:
            nproc += _user_tasks(os.geteuid())  # without a user namespace the count is per user, host-wide
        return {
            "limits": {
                "RLIMIT_CPU": lim.cpu_seconds,
                "RLIMIT_AS": lim.memory_bytes,
                "RLIMIT_FSIZE": lim.file_size_bytes,
                "RLIMIT_NPROC": nproc,
                "RLIMIT_NOFILE": lim.open_files,
                "RLIMIT_CORE": 0,
            },
            "output_bytes": lim.output_bytes,
            "workdir": "/workspace" if self.level != "process" else str(self.workspace),
            "uid": _INSIDE_UID if self._owner else None,
            "gid": _INSIDE_UID if self._owner else None,
            "block_network": self.level == "process",
            "pdeathsig": self.level != "bubblewrap",
        }

    def _start(self) -> None:
        config = self._config()
        resp_r, resp_w = os.pipe()
        config["resp_fd"] = resp_w
        ours: list[int] = []  # our ends of the setup pipes
        theirs = [resp_w]  # the child's ends: closed here once it has them
        env, cwd = _env("/workspace"), "/"
        if self.level == "bubblewrap":
            info_r, info_w = os.pipe()
            ours.append(info_r)
            theirs.append(info_w)
            block = None
            if self._root:
                block, block_w = os.pipe()
                ours.append(block_w)
                theirs.append(block)
            # bwrap's options travel through a pipe: /proc/1/cmdline inside would show every host path
            options = b"\0".join(arg.encode() for arg in self._bwrap_args(info_w, block)) + b"\0"
            args_r, args_w = os.pipe()
            theirs.append(args_r)
            if len(options) > fcntl.fcntl(args_w, fcntl.F_GETPIPE_SZ):
                fcntl.fcntl(args_w, fcntl.F_SETPIPE_SZ, len(options))
            os.write(args_w, options)
            os.close(args_w)
            args = ["bwrap", "--args", str(args_r), sys.executable, "-I", "-S", "-B", "/sandbox/worker.py"]
            env = {"PATH": env["PATH"]}  # bwrap's own environment: /proc/1/environ inside shows this
        elif self.level == "namespaces":
            args = self._unshare_args(config)
        else:
            args = [sys.executable, "-I", "-S", "-B", str(_WORKER)]
            env, cwd = _env(str(self.workspace)), str(self.workspace)
        pipe = subprocess.PIPE
        popen = functools.partial(subprocess.Popen, args, stdin=pipe, stdout=pipe, stderr=pipe, pass_fds=theirs)
        try:
            proc = _SPAWNER.submit(popen, env=env, cwd=cwd, start_new_session=True).result()
        except BaseException:
            for fd in ours + theirs + [resp_r]:
                os.close(fd)
            raise
        for fd in theirs:
            os.close(fd)
        session = _Session(proc, resp_r)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        out, err = _Capture(1 << 16), _Capture(1 << 16)
        try:
            hello = (json.dumps(config) + "\n").encode()  # the worker's first line: its configuration
            if self.level == "bubblewrap":
                init_pid = self._bwrap_handshake(ours, session, deadline)
            elif self.level == "namespaces" and self._root:
                mine = os.readlink("/proc/self/ns/user")
                _wait_for(lambda: os.readlink(f"/proc/{proc.pid}/ns/user") != mine, deadline, proc, "no user ns")
                _write_id_maps(proc.pid)
                hello = b"go\n" + hello
            reply, _ = session.exchange(hello, deadline, out, err)
            if not reply or not reply.get("ready"):
                session.kill(grace=1.0, out=out, err=err)
                raise RuntimeError(f"sandbox ({self.level}) failed to start: {err.text().strip() or out.text()}")
            if self.level == "namespaces":
                init_pid = _wait_for(lambda: _child_of(proc.pid), deadline, proc, "no namespace init")
            if self.level != "process":
                session.watch(init_pid)
            if not reply.get("seccomp") and not self.allow_unisolated:
                raise _no_seccomp()
            if not reply.get("seccomp") and not any("seccomp" in w for w in self.warnings):
                self._warn(f"no seccomp filter on {platform.machine()}: one layer fewer")
        except BaseException:
            session.kill()
            raise
        finally:
            for fd in ours:
                os.close(fd)
        self._session = session

    def _bwrap_args(self, info_fd: int, block_fd: int | None) -> list[str]:
        """bwrap's options (the command comes after them)."""
        tmp = str(self.limits.tmp_bytes)
        args = ["--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"]
        args += ["--hostname", "sandbox", "--info-fd", str(info_fd), "--clearenv"]
        for key, value in _env("/workspace").items():
            args += ["--setenv", key, value]
        if block_fd is not None:  # root parent: we write the uid map (see _write_id_maps), the worker drops
            args += ["--userns-block-fd", str(block_fd)]
        else:  # bwrap maps us to _INSIDE_UID and drops every capability itself
            args += ["--disable-userns", "--uid", str(_INSIDE_UID), "--gid", str(_INSIDE_UID)]
        args += ["--proc", "/proc", "--dev", "/dev"]
        for path in ("/tmp", "/dev/shm"):  # before the binds: a venv living under /tmp stays visible
            args += ["--perms", "1777", "--size", tmp, "--tmpfs", path]
        binds, links = _host_paths()
        for target, path in links:
            args += ["--symlink", target, path]
        for folder in _parents(dst for _, dst in binds):  # else bwrap copies the host's modes (/root: 0700)
            args += ["--perms", "0755", "--dir", folder]
        for src, dst in binds:
            args += ["--ro-bind", src, dst]
        args += ["--ro-bind", str(_WORKER), "/sandbox/worker.py"]
        return args + ["--bind", str(self.workspace), "/workspace", "--chdir", "/workspace", "--remount-ro", "/"]

    def _bwrap_handshake(self, ours: list[int], session: _Session, deadline: float) -> int:
        """Read bwrap's --info-fd (the namespace init's host pid); as root, write the uid map and unblock it."""
        info_r = ours[0]
        data = b""
        while True:
            try:
                info = json.loads(data)
                break
            except ValueError:
                pass
            ready, _, _ = select.select([info_r], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(info_r, 4096) if ready else b""
            if not chunk:
                out, err = _Capture(1 << 16), _Capture(1 << 16)
                session.kill(grace=1.0, out=out, err=err)
                raise RuntimeError(f"bwrap failed to start: {err.text().strip()}")
            data += chunk
        init_pid = int(info["child-pid"])
        if self._root:
            _write_id_maps(init_pid)
            os.write(ours[1], b"1")
        return init_pid

    def _unshare_args(self, config: dict) -> list[str]:
        binds, links = _host_paths()
        config["jail"] = {
            "binds": [(src, dst, False) for src, dst in binds] + [(str(self.workspace), "/workspace", True)],
            "symlinks": links,
            "tmp_bytes": self.limits.tmp_bytes,
        }
        guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        as_root = [] if self._root else ["--map-root-user"]
        args = [*guard, "unshare", "--user", *as_root, "--mount", "--net", "--pid", "--ipc", "--uts", "--cgroup"]
        args += ["--fork", "--kill-child", "--"]
        if self._root:  # exec only once the parent has written the uid map: exec computes the capabilities
            args += ["/bin/sh", "-c", 'read -r _ && exec "$@"', "sh"]
        return args + [sys.executable, "-I", "-S", "-B", str(_WORKER)]

    def _stop(self) -> None:
        if self._session is not None:
            self._session.kill()
            self._session = None

    def _open_dir(self, name: str, create: bool) -> tuple[int, str]:
        """An fd of the folder holding ``name`` inside the workspace, walked without following any symlink."""
        path = PurePosixPath(name)
        if not name or "\0" in name or path.is_absolute() or ".." in path.parts or not path.parts:
            raise UserError(f"bad sandbox file name {name!r}: expected a relative path inside the workspace")
        fd = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in path.parts[:-1]:
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                        if self._owner:
                            os.chown(part, *self._owner, dir_fd=fd, follow_symlinks=False)
                    except FileExistsError:
                        pass
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = sub
        except OSError as e:
            os.close(fd)
            raise UserError(
                f"cannot open {name!r} in the sandbox workspace: {e.strerror} (symlinks are refused)"
            ) from e
        return fd, path.parts[-1]

    @staticmethod
    def _open_leaf(name: str, leaf: str, dir_fd: int, flags: int) -> int:
        try:
            fd = os.open(leaf, flags, 0o644, dir_fd=dir_fd)
        except OSError as e:
            raise UserError(
                f"cannot open {name!r} in the sandbox workspace: {e.strerror} (symlinks are refused)"
            ) from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{name!r} in the sandbox workspace is not a regular file")
        return fd
