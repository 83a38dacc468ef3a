"""The process inside the sandbox: runs the model's code in one persistent namespace.

Started by tinychat.agent.sandbox as ``python -I -S -B _sandbox_worker.py CONFIG_JSON``. Standard library
only: the tinychat package is deliberately not visible inside the sandbox.

Protocol (JSON lines, never pickle): requests arrive on stdin, which is moved off fd 0 at start so user code
cannot read them by accident; replies go to the fd named in the config. The user code's stdout and stderr are
plain fds 1 and 2, which the parent reads and caps; subprocesses started by the user code write there too.

Order at start, each step needing the privileges the next one gives up:
  1. (namespaces level) build the jail: private mounts, a tmpfs root with read-only binds, pivot_root.
  2. drop privileges: empty capability bounding set, switch to the sandbox uid (or lock out root's
     capabilities when only uid 0 is mapped), no_new_privs; then check that no capability is left.
  3. a seccomp filter that refuses the syscalls a contained program has no use for (ptrace, mount, unshare,
     bpf, keyctl, ...), and at the process level every socket that is not AF_UNIX.
  4. (namespaces level) fork: this process stays as pid 1 of the pid namespace and only reaps orphans.
  5. resource limits, close every inherited fd that is not ours, then import the venv's site-packages.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import fcntl
import io
import json
import linecache
import os
import platform
import resource
import signal
import socket
import struct
import sys
import traceback

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
# SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED
SECUREBITS_NO_ROOT = 1 | 2 | 8 | 32

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2

# Syscalls refused with EPERM. Numbers per architecture: (audit arch, {name: nr}).
_DENY = (
    "ptrace process_vm_readv process_vm_writev mount umount2 pivot_root chroot unshare setns open_tree move_mount "
    "fsopen fsconfig fsmount fspick mount_setattr bpf perf_event_open userfaultfd keyctl add_key request_key "
    "kexec_load kexec_file_load init_module finit_module delete_module swapon swapoff reboot acct syslog vhangup "
    "iopl ioperm quotactl settimeofday clock_settime adjtimex sethostname setdomainname name_to_handle_at "
    "open_by_handle_at io_uring_setup io_uring_enter io_uring_register"
).split()
_NEW_SYSCALLS = dict(
    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428, move_mount=429, fsopen=430,
    fsconfig=431, fsmount=432, fspick=433, clone3=435, mount_setattr=442,
)  # fmt: skip
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(
        _NEW_SYSCALLS, clone=56, socket=41, ptrace=101, syslog=103, vhangup=153, pivot_root=155, adjtimex=159,
        chroot=161, acct=163, settimeofday=164, mount=165, umount2=166, swapon=167, swapoff=168, reboot=169,
        sethostname=170, setdomainname=171, iopl=172, ioperm=173, init_module=175, delete_module=176, quotactl=179,
        clock_settime=227, kexec_load=246, add_key=248, request_key=249, keyctl=250, unshare=272,
        perf_event_open=298, name_to_handle_at=303, open_by_handle_at=304, setns=308, process_vm_readv=310,
        process_vm_writev=311, finit_module=313, kexec_file_load=320, bpf=321, userfaultfd=323,
    )),
    "aarch64": (0xC00000B7, dict(
        _NEW_SYSCALLS, clone=220, socket=198, ptrace=117, syslog=116, vhangup=58, pivot_root=41, adjtimex=171,
        chroot=51, acct=89, settimeofday=170, mount=40, umount2=39, swapon=224, swapoff=225, reboot=142,
        sethostname=161, setdomainname=162, init_module=105, delete_module=106, quotactl=60, clock_settime=112,
        kexec_load=104, add_key=217, request_key=218, keyctl=219, unshare=97, perf_event_open=241,
        name_to_handle_at=264, open_by_handle_at=265, setns=268, process_vm_readv=270, process_vm_writev=271,
        finit_module=273, kexec_file_load=294, bpf=280, userfaultfd=282,
    )),
}  # fmt: skip
# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
_CLONE_NEW_ANY = 0x7E020000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int = 0) -> int:
    return _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


# ---------------------------------------------------------------- the jail (namespaces level only)


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def _remount_ro(path: str) -> None:
    # A bind mount keeps the flags the kernel locked on the source (nosuid, nodev, ...): repeat them.
    f = os.statvfs(path).f_flag
    keep = {os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, 4096: MS_RELATIME}
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    flags |= sum(ms for st, ms in keep.items() if f & st)
    _mount(None, path, None, flags)


def _build_jail(spec: dict) -> None:
    """tmpfs root + read-only binds + rw workspace + fresh /proc, /dev, /tmp; then pivot_root into it."""
    arch = platform.machine()
    pivot_nr = {"x86_64": 155, "aarch64": 41}[arch]
    # Open every source first: the new root is mounted over /tmp, which may hide some of them.
    sources = {src: os.open(src, os.O_PATH | os.O_CLOEXEC) for src, _dst, _rw in spec["binds"]}
    for dev in ("null", "zero", "full", "random", "urandom"):
        sources.setdefault(f"/dev/{dev}", os.open(f"/dev/{dev}", os.O_PATH | os.O_CLOEXEC))
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    root = "/tmp"
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.makedirs(root + "/dev")
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")

    def bind(src: str, dst: str, rw: bool) -> None:
        target = root + dst
        if os.path.isdir(f"/proc/self/fd/{sources[src]}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        _mount(f"/proc/self/fd/{sources[src]}", target, None, MS_BIND | MS_REC)
        if not rw:
            _remount_ro(target)

    for tmp in ("/tmp", "/dev/shm"):  # before the binds: a venv living under /tmp stays visible
        os.makedirs(root + tmp)
        _mount("tmpfs", root + tmp, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={spec['tmp_bytes']}")
    for src, dst, rw in spec["binds"]:
        bind(src, dst, rw)
    for target, link in spec["symlinks"]:
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        os.symlink(target, root + link)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for dev in ("null", "zero", "full", "random", "urandom"):
        bind(f"/dev/{dev}", f"/dev/{dev}", True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "fd/0"), ("stdout", "fd/1"), ("stderr", "fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    for fd in sources.values():
        os.close(fd)
    os.chdir(root)
    _check(_libc.syscall(ctypes.c_long(pivot_nr), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")  # the host's tree is gone from this namespace
    os.chdir("/")
    _remount_ro("/")
    # the new network namespace's loopback starts down: bring it up so code can serve itself on 127.0.0.1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = 0x1 | 0x8 | 0x40  # IFF_UP | IFF_LOOPBACK | IFF_RUNNING
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sh22x", b"lo", flags))  # SIOCSIFFLAGS on a struct ifreq


def _become_init() -> None:
    """Fork; the parent stays pid 1 of the pid namespace, reaps orphans and exits with the worker."""
    child = os.fork()
    if child == 0:
        return
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) > 2:
            with contextlib.suppress(OSError):
                os.close(int(fd))  # keep no pipe open: the parent must see EOF when the worker dies
    os.closerange(0, 3)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


# ---------------------------------------------------------------- privileges, seccomp, limits


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    for cap in range(64):  # empty the bounding set: no exec can give capabilities back
        _prctl(PR_CAPBSET_DROP, cap)
    if uid is not None and os.getuid() != uid:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
    elif os.getuid() == 0:
        # Only uid 0 exists here: keep it, but lock out the capabilities root would get.
        _prctl(PR_SET_SECUREBITS, SECUREBITS_NO_ROOT)
        header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3
        _check(_libc.capset(header, ctypes.create_string_buffer(24)), "capset")  # all three sets empty
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith(("CapPrm", "CapEff"))]
    if any(int(c, 16) for c in caps):
        raise RuntimeError(f"capabilities left after the drop: {caps}")


def _seccomp_program(block_network: bool) -> bytes | None:
    """A classic-BPF filter: refuse _DENY (EPERM), namespace-creating clone flags, clone3 (ENOSYS: libc then
    uses clone, whose flags a filter can see) and, if asked, socket() for anything but AF_UNIX."""
    arch = platform.machine()
    if arch not in _SYSCALLS:
        return None
    audit_arch, nr = _SYSCALLS[arch]
    ld = lambda offset: (0x20, 0, 0, offset)  # BPF_LD | BPF_W | BPF_ABS: a 32-bit word of struct seccomp_data
    jeq = lambda k, jt, jf: (0x15, jt, jf, k)  # BPF_JMP | BPF_JEQ | BPF_K
    ret = lambda value: (0x06, 0, 0, value)  # BPF_RET | BPF_K
    allow, deny, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    # Jumps only go forward; a str target is a label resolved once the layout is known.
    body: list[tuple] = [ld(4), jeq(audit_arch, 1, 0), ret(kill), ld(0)]  # wrong arch: kill; then load the nr
    if arch == "x86_64":
        body.append((0x35, "DENY", 0, 0x40000000))  # BPF_JGE: the x32 ABI numbers, which nothing here needs
    body += [jeq(nr[name], "DENY", 0) for name in _DENY if name in nr]
    body.append(jeq(nr["clone3"], "ENOSYS", 0))
    if block_network:
        body += [jeq(nr["socket"], 0, 3), ld(16), jeq(1, "ALLOW", 0), ret(deny)]  # args[0] == AF_UNIX only
    body += [jeq(nr["clone"], 0, "ALLOW"), ld(16), (0x45, "DENY", 0, _CLONE_NEW_ANY)]  # BPF_JSET on the flags
    labels = {"ALLOW": len(body), "DENY": len(body) + 1, "ENOSYS": len(body) + 2}
    body += [ret(allow), ret(deny), ret(enosys)]
    resolve = lambda i, j: labels[j] - i - 1 if isinstance(j, str) else j
    return b"".join(struct.pack("<HBBI", c, resolve(i, jt), resolve(i, jf), k) for i, (c, jt, jf, k) in enumerate(body))


def _install_seccomp(program: bytes) -> None:
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    ret = _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0)
    _check(ret, "seccomp")


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        which = getattr(resource, name)
        soft, hard = (value, value + 1) if name == "RLIMIT_CPU" else (value, value)  # SIGXCPU, then SIGKILL
        resource.setrlimit(which, (soft, hard))


# ---------------------------------------------------------------- running code


class _CappedRaw(io.RawIOBase):
    """fd writer that passes at most `left` bytes per call and counts the rest: print loops stay cheap."""

    def __init__(self, fd: int) -> None:
        self.fd, self.left, self.dropped = fd, 0, 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, b) -> int:  # noqa: ANN001 - bytes-like
        view = memoryview(b).cast("B")
        keep = view[: max(0, self.left)]
        self.left -= len(keep)
        self.dropped += len(view) - len(keep)
        while keep:
            keep = keep[os.write(self.fd, keep) :]
        return len(view)


class _Worker:
    def __init__(self, config: dict, requests: io.BufferedReader, resp_fd: int) -> None:
        self.requests = requests
        self.resp_fd = resp_fd
        self.cap = config["output_bytes"]
        self.pid = os.getpid()
        self.ns: dict = {"__name__": "__main__", "__builtins__": builtins}
        self.raws = [_CappedRaw(1), _CappedRaw(2)]
        self.streams = [
            io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True)
            for raw in self.raws
        ]
        self.cells = 0

    def send(self, message: dict) -> None:
        data = memoryview((json.dumps(message) + "\n").encode())
        while data:
            data = data[os.write(self.resp_fd, data) :]

    def serve(self) -> None:
        for line in self.requests:
            request = json.loads(line)
            error = self.run(request["code"])
            if os.getpid() != self.pid:
                os._exit(0)  # a fork of the user code returned here: only the real worker answers
            self.send({"id": request["id"], "error": error, "dropped": [r.dropped for r in self.raws]})

    def run(self, code: str) -> str:
        for raw in self.raws:
            raw.left, raw.dropped = self.cap, 0
        sys.stdout, sys.stderr = self.streams
        self.cells += 1
        name = f"<cell {self.cells}>"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        try:
            tree = ast.parse(code, name, "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, name, "exec"), self.ns)
            if last is not None:
                value = eval(compile(last, name, "eval"), self.ns)
                if value is not None:
                    self.ns["_"] = value
                    print(repr(value))
            error = ""
        except BaseException as e:  # SystemExit and KeyboardInterrupt too: the session goes on
            error = self.format(e)
        for stream in self.streams:
            with contextlib.suppress(BaseException):  # a closed fd 1 is the user's business
                stream.flush()
        return error

    def format(self, e: BaseException) -> str:
        try:
            tb = e.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next  # show the user's frames only
            text = "".join(traceback.format_exception(type(e), e, tb))
        except BaseException:
            text = f"{type(e).__name__} (the traceback could not be formatted)\n"
        if len(text) > self.cap:
            text = (
                text[: self.cap // 2]
                + f"\n[... truncated {len(text) - self.cap} characters]\n"
                + text[-self.cap // 2 :]
            )
        return text


def main() -> None:
    requests = open(os.dup(0), "rb", buffering=1 << 16)  # noqa: SIM115 - lives as long as the worker
    config = json.loads(requests.readline())  # not argv: /proc/<pid>/cmdline is readable by the code
    resp_fd = config["resp_fd"]
    if config.get("pdeathsig"):
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if config.get("jail"):
        _build_jail(config["jail"])
    _drop_privileges(config.get("uid"), config.get("gid"))
    program = _seccomp_program(config.get("block_network", False))
    if program is not None:
        _install_seccomp(program)
    if config.get("jail"):
        _become_init()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # user code reading stdin gets EOF, not our requests
    keep = sorted({0, 1, 2, requests.fileno(), resp_fd})
    for lo, hi in zip(keep, keep[1:] + [1 << 20]):
        os.closerange(lo + 1, hi)  # every stray fd inherited from bwrap/unshare/the parent
    _set_limits(config["limits"])
    os.chdir(config["workdir"])
    sys.dont_write_bytecode = True
    import site  # noqa: PLC0415 - after the drop: the venv's .pth files run unprivileged

    site.main()
    worker = _Worker(config, requests, resp_fd)
    worker.send({"ready": True, "pid": os.getpid(), "uid": os.getuid(), "seccomp": program is not None})
    worker.serve()


if __name__ == "__main__":
    main()
