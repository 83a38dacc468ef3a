"""Adversarial tests: model-written code tries to escape the sandbox; every attempt must be contained.

Each test plays one attack from inside and checks its effect from outside (the host file unchanged, the listener
never accepted, the sentinel process alive, ...), then that the parent is healthy and nothing is left running.
They run at the best level this machine has (bubblewrap when bwrap is installed); a reduced subset also runs at
the "namespaces" level. At the "process" level (rlimits only) they are skipped: it contains nothing by design.
"""

from __future__ import annotations

import ast
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_procs import alive, no_leftover_processes

import tinychat
from tinychat.agent.sandbox import Limits, Sandbox, available_levels, isolation_level
from tinychat.errors import UserError

LEVEL = isolation_level()
NS_LEVELS = [level for level in ("bubblewrap", "namespaces") if level in available_levels()]
REPO = Path(tinychat.__file__).resolve().parents[1]
LIMITS = Limits(timeout=10, cpu_seconds=10, memory_bytes=256 << 20, max_processes=24, file_size_bytes=1 << 20)
FORK_BOMB = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.05)\n"

pytestmark = pytest.mark.skipif(LEVEL == "process", reason="the process level (rlimits only) contains nothing")


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    with no_leftover_processes():
        yield


@pytest.fixture
def box(tmp_path):
    with Sandbox(tmp_path / "ws", LIMITS, level=LEVEL) as sb:
        yield sb


@pytest.fixture(params=NS_LEVELS)
def ns_box(request, tmp_path):
    """The reduced subset: the same attack at every namespace level this machine has."""
    with Sandbox(tmp_path / "ws", LIMITS, level=request.param) as sb:
        yield sb


def probe(sb: Sandbox, code: str, timeout: float = 10) -> str:
    """Run attack code that reports what happened on stdout; it must neither raise, time out nor crash."""
    r = sb.run(code, timeout=timeout)
    assert not (r.error or r.timed_out or r.crashed), r.as_text()
    return r.stdout


def assert_healthy(sb: Sandbox) -> None:
    assert sb.run("print('still here')").stdout == "still here\n"
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still fork


# ---------------------------------------------------------------- network


def test_cannot_reach_a_listener_on_the_host(ns_box):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    abstract = f"\0tinychat-escape-{uuid.uuid4().hex}"
    usrv = socket.socket(socket.AF_UNIX)
    usrv.bind(abstract)  # abstract unix sockets are per network namespace (the D-Bus/X11 route)
    usrv.listen()
    try:
        out = probe(
            ns_box,
            "import socket\n"
            f"for family, addr in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET6, ('::1', {port})),"
            f" (socket.AF_UNIX, {abstract!r})]:\n"
            "    try:\n"
            "        s = socket.socket(family); s.settimeout(2); s.connect(addr); print('CONNECTED', family)\n"
            "    except OSError as e:\n"
            "        print('blocked', e.errno)\n",
        )
        assert "CONNECTED" not in out and out.count("blocked") == 3
        for server in (srv, usrv):
            server.settimeout(0.2)
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        srv.close()
        usrv.close()


def test_cannot_reach_the_internet_or_dns(ns_box):
    out = probe(
        ns_box,
        "import socket\n"
        "for addr in [('1.1.1.1', 443), ('8.8.8.8', 53), ('2606:4700:4700::1111', 443)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=2); print('CONNECTED', addr)\n"
        "    except OSError as e:\n"
        "        print('blocked', e.errno)\n"
        "try:\n"
        "    socket.getaddrinfo('example.com', 80); print('RESOLVED')\n"
        "except OSError:\n"
        "    print('no dns')\n",
    )
    assert "CONNECTED" not in out and "RESOLVED" not in out
    assert out.count("blocked") == 3 and "no dns" in out


# ---------------------------------------------------------------- the host's files


def test_host_files_are_invisible(ns_box):
    secrets = [
        "/etc/shadow",
        "/etc/passwd",
        "/etc/hostname",
        "/root/.bash_history",
        "/root/.ssh",
        str(REPO / "pyproject.toml"),
        str(REPO / "tinychat" / "__init__.py"),
        f"/proc/{os.getpid()}/environ",  # the parent's pid means nothing inside the pid namespace
        "/proc/1/root/etc/shadow",  # the namespace's init: another way up, if it were the host's
        "/proc/1/cwd/pyproject.toml",
        "/home",
        "/var/log",
        "/sys/class",
    ]
    out = probe(
        ns_box,
        "import os\n"
        f"for path in {secrets!r}:\n"
        "    try:\n"
        "        data = open(path, 'rb').read() if not os.path.isdir(path) else os.listdir(path)\n"
        "        print('READ', path)\n"
        "    except OSError as e:\n"
        "        print('hidden', type(e).__name__)\n"
        "print('root:', sorted(os.listdir('/root')))\n"
        f"print('repo:', sorted(os.listdir({str(REPO)!r})) if os.path.isdir({str(REPO)!r}) else None)\n",
    )
    assert "READ" not in out and out.count("hidden") == len(secrets)
    host_root = set(os.listdir("/root")) - {".pyenv"}  # .pyenv: this machine's interpreter lives there
    assert not any(f"'{name}'" in out for name in host_root), out
    assert "pyproject.toml" not in out and "'tinychat'" not in out  # the repository is not there


def test_writes_outside_the_workspace_do_not_reach_the_host(ns_box, tmp_path):
    sentinel = tmp_path / "host-sentinel.txt"
    sentinel.write_text("original")
    host_tmp = Path("/tmp") / f"tinychat-escape-{uuid.uuid4().hex}"
    targets = [str(sentinel), str(host_tmp), "/usr/lib/evil", "/etc/evil", "/evil", "/root/evil", str(REPO / "evil")]
    try:
        out = probe(
            ns_box,
            "import os\n"
            f"for path in {targets!r}:\n"
            "    try:\n"
            "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
            "        open(path, 'w').write('pwned'); print('wrote', path)\n"
            "    except OSError as e:\n"
            "        print('refused', path, e.errno)\n",
        )
        assert sentinel.read_text() == "original"
        assert not host_tmp.exists() and not (REPO / "evil").exists()
        assert not Path("/evil").exists() and not Path("/etc/evil").exists() and not Path("/usr/lib/evil").exists()
        # only the private, in-memory /tmp accepts writes
        assert out.count("refused") >= len(targets) - 2, out
    finally:
        host_tmp.unlink(missing_ok=True)


def test_symlink_tricks(box, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOPSECRET")
    passwd = Path("/etc/passwd").read_bytes()
    ws = box.workspace
    os.symlink(secret, ws / "link-secret")
    os.symlink("/etc/passwd", ws / "link-passwd")
    os.symlink(tmp_path, ws / "link-dir")
    out = probe(
        box,
        "import os\n"
        "for name in ['link-secret', 'link-passwd', 'link-dir/host-secret.txt']:\n"
        "    try:\n"
        "        print('READ', name, open(name).read()[:20])\n"
        "    except OSError as e:\n"
        "        print('dangling', name, e.errno)\n"
        "os.symlink('/etc/shadow', 'evil'); os.symlink('/', 'rootlink')\n"
        "try:\n"
        "    os.link('/etc/ld.so.cache', 'hardlink'); print('LINKED')\n"
        "except OSError as e:\n"
        "    print('no hardlink', e.errno)\n",
    )
    assert "READ" not in out and "TOPSECRET" not in out and out.count("dangling") == 3
    assert "LINKED" not in out
    # the parent never follows a link out of the workspace either
    for name in ["link-secret", "link-passwd", "link-dir/host-secret.txt", "evil", "rootlink/etc/shadow"]:
        with pytest.raises(UserError):
            box.get_file(name)
    stray = f"tinychat-escape-{uuid.uuid4().hex}"
    for name in ["link-passwd", "link-dir/host-secret.txt", f"link-dir/{stray}", f"rootlink/tmp/{stray}", "evil"]:
        with pytest.raises(UserError):
            box.put_file(name, b"pwned")
    assert secret.read_text() == "TOPSECRET" and Path("/etc/passwd").read_bytes() == passwd
    assert not (tmp_path / stray).exists() and not (Path("/tmp") / stray).exists()


def test_shell_commands_cannot_read_secrets_or_download(box):
    shadow = Path("/etc/shadow").read_text().splitlines() if Path("/etc/shadow").exists() else []
    script = (
        "cat /etc/shadow; echo cat=$?; "
        "curl -sS -m 3 http://1.1.1.1/; echo curl=$?; "
        "wget -q -T 3 -O- http://1.1.1.1/; echo wget=$?; "
        f"{sys.executable} -c \"import urllib.request as u; u.urlopen('http://1.1.1.1', timeout=3)\"; echo py=$?"
    )
    out = probe(
        box,
        "import os, subprocess\n"
        f"r = subprocess.run(['sh', '-c', {script!r}], capture_output=True, text=True)\n"
        "print(r.stdout, r.stderr)\n"
        "os.system('cat /etc/shadow /root/.bashrc')\n",
    )
    assert not any(line and line in out for line in shadow)
    for tool in ("cat", "curl", "wget", "py"):
        assert f"{tool}=" in out and f"{tool}=0" not in out, out


# ---------------------------------------------------------------- processes and the kernel


def test_fork_bomb_is_contained(tmp_path):
    limits = Limits(timeout=3, cpu_seconds=30, memory_bytes=256 << 20, max_processes=24)
    with Sandbox(tmp_path / "ws", limits, level=LEVEL) as sb:
        seen: set[int] = set()
        peak, host_fork_ok, stop = [0], [], threading.Event()

        def watch() -> None:
            start = time.monotonic()
            while not stop.is_set():
                pids = sb.host_pids()
                seen.update(pids)
                peak[0] = max(peak[0], len(pids))
                if not host_fork_ok and time.monotonic() - start > 1.0:  # mid-bomb: can the host still fork?
                    t0 = time.monotonic()
                    subprocess.run(["true"], timeout=10)
                    host_fork_ok.append(time.monotonic() - t0)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            r = sb.run(FORK_BOMB)
        finally:
            stop.set()
            watcher.join()
        assert r.timed_out
        # RLIMIT_NPROC, counted inside the sandbox's user namespace (+1: the namespace's init)
        assert 10 <= peak[0] <= limits.max_processes + 1, peak
        assert host_fork_ok and host_fork_ok[0] < 5
        r = sb.run("print('fresh')")
        assert r.restarted and r.stdout == "fresh\n"
    assert not [pid for pid in seen if alive(pid)]


def test_fork_count_stops_at_max_processes(ns_box):
    out = probe(
        ns_box,
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('fork refused', e.errno)\n"
        "print(n)\n",
    )
    assert "fork refused 11" in out  # EAGAIN
    assert int(out.split()[-1]) < LIMITS.max_processes
    assert len(ns_box.host_pids()) <= LIMITS.max_processes + 1


def test_memory_bomb(box):
    r = box.run("import numpy\nnumpy.ones(1 << 31)")  # 16 GiB at once
    assert "MemoryError" in r.error or r.crashed, r.as_text()
    r = box.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))")  # a little at a time
    assert "MemoryError" in r.error or r.crashed, r.as_text()
    r = box.run("print(len(chunks) > 4 if 'chunks' in globals() else 'restarted')\nchunks = None")
    assert r.stdout == ("restarted\n" if r.restarted else "True\n")
    assert_healthy(box)


def test_infinite_loop_times_out(box):
    before = box.host_pids()
    r = box.run("while True:\n    pass", timeout=1)
    assert r.timed_out and 1 <= r.duration < 4
    assert not [pid for pid in before if alive(pid)]  # the whole namespace was killed
    r = box.run("print('again')")
    assert r.restarted and r.stdout == "again\n"


def test_cpu_time_limit(tmp_path):
    with Sandbox(tmp_path / "ws", Limits(timeout=20, cpu_seconds=1), level=LEVEL) as sb:
        r = sb.run("while True:\n    pass")
        assert not r.timed_out and "CPU time limit" in r.crashed and r.duration < 8
        # a background child that spins between calls is stopped by its own RLIMIT_CPU
        probe(sb, f"import subprocess\nsubprocess.Popen([{sys.executable!r}, '-c', 'while True: pass'])")
        deadline = time.monotonic() + 15
        while len(sb.host_pids()) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sb.host_pids()) == 2  # init and the worker


def test_huge_output_is_capped_in_the_parent(box):
    tracemalloc.start()
    try:
        r = box.run(
            "import os, sys\nprint('x' * 30_000_000)\nsys.stdout.flush()\nos.system('head -c 50000000 /dev/zero')\n"
            "_ = os.write(2, b'e' * 10_000_000)"
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    cap = LIMITS.output_bytes
    assert len(r.stdout) < cap + 100 and len(r.stderr) < cap + 100
    assert r.stdout.endswith(f"[... truncated {30_000_001 + 50_000_000 - cap} bytes]\n")
    assert r.stderr.endswith(f"[... truncated {10_000_000 - cap} bytes]\n")
    assert peak < 8 << 20, f"the parent held {peak} bytes"
    assert_healthy(box)


def test_killing_the_parent_from_inside(box):
    sentinel = subprocess.Popen(["sleep", "60"])  # a host process the sandbox must not be able to touch
    try:
        r = box.run(
            "import os, signal, subprocess\n"
            f"for target in (os.getppid(), 1, {os.getpid()}, {sentinel.pid}, -1):\n"
            "    try:\n"
            "        os.kill(target, signal.SIGKILL); print('sent', target)\n"
            "    except OSError as e:\n"
            "        print('refused', target, e.errno)\n"
            "subprocess.run(['kill', '-9', '-1'])\n"
        )
        assert "refused" in r.stdout or r.crashed, r.as_text()  # kill -1 from a child may take the worker too
        assert sentinel.poll() is None
        r = box.run("print('alive')")
        assert r.stdout == "alive\n"
        assert_healthy(box)
    finally:
        sentinel.kill()
        sentinel.wait()


def test_parent_environment_is_invisible(monkeypatch, tmp_path):
    canary = f"xyz-{uuid.uuid4().hex}"
    monkeypatch.setenv("TINYCHAT_SECRET", canary)
    for level in NS_LEVELS:
        with Sandbox(tmp_path / level, LIMITS, level=level) as sb:
            out = probe(
                sb,
                "import os, subprocess\n"
                f"canary = {canary!r}\n"
                "print('env', 'TINYCHAT_SECRET' in os.environ, canary in str(os.environ))\n"
                "leaks = []\n"
                "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
                "    try:\n"
                "        if canary.encode() in open(f'/proc/{pid}/environ', 'rb').read():\n"
                "            leaks.append(pid)\n"
                "    except OSError:\n"
                "        pass\n"
                "print('proc leaks', leaks)\n"
                "print('shell', canary in subprocess.run(['env'], capture_output=True, text=True).stdout)\n",
            )
            assert out == "env False False\nproc leaks []\nshell False\n", out


def test_ctypes_syscalls_are_refused(ns_box):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        out = probe(
            ns_box,
            "import ctypes, os, socket, struct\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "calls = {\n"
            "    'unshare-user': lambda: libc.unshare(0x10000000),\n"
            "    'unshare-net': lambda: libc.unshare(0x40000000),\n"
            "    'ptrace-init': lambda: libc.ptrace(16, 1, 0, 0),\n"
            "    'mount': lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
            "    'chroot': lambda: libc.chroot(b'/tmp'),\n"
            "    'setuid-0': lambda: libc.setuid(0) if os.getuid() else -1,  # already 0: a no-op, no capability\n"
            "}\n"
            "for name, call in calls.items():\n"
            "    print(name, call())\n"
            "fd = libc.socket(2, 1, 0)\n"
            f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + socket.inet_aton('127.0.0.1') + bytes(8)\n"
            "print('libc-connect', libc.connect(fd, addr, len(addr)))\n",
        )
        results = dict(line.rsplit(" ", 1) for line in out.splitlines())
        assert all(value == "-1" for value in results.values()), out
        srv.settimeout(0.2)
        with pytest.raises(TimeoutError):
            srv.accept()
    finally:
        srv.close()


def test_huge_file_is_limited(box):
    out = probe(
        box,
        "import subprocess\n"
        "try:\n"
        "    open('big.bin', 'wb').write(b'x' * (3 << 20)); print('WROTE')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
        "r = subprocess.run(['dd', 'if=/dev/zero', 'of=big2.bin', 'bs=1M', 'count=3'], capture_output=True)\n"
        "print('dd', r.returncode)\n",
    )
    assert "refused 27" in out and "dd 0" not in out  # EFBIG; dd dies of SIGXFSZ
    for name in ("big.bin", "big2.bin"):
        assert (box.workspace / name).stat().st_size <= LIMITS.file_size_bytes


def test_host_processes_are_invisible(ns_box):
    out = probe(
        ns_box,
        "import os\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "cmds = [open(f'/proc/{p}/cmdline', 'rb').read() for p in pids]\n"
        f"print(len(pids), max(pids), {Path('/proc/self/cmdline').read_bytes()!r} in cmds)\n"
        f"print(b'pytest' in b''.join(cmds), {str(ns_box.workspace).encode()!r} in b''.join(cmds))\n"
        "import shutil, subprocess\n"
        "ps = shutil.which('ps') and subprocess.run(['ps', '-e', '-o', 'pid='], capture_output=True, text=True)\n"
        "print(len(ps.stdout.split()) if ps else 'no-ps')\n",
    )
    count, biggest, parent_seen, pytest_named, host_path_named, ps_count = out.split()
    assert int(count) <= 3 and int(biggest) <= 10 and parent_seen == "False", out
    # the host's workspace path (and pytest's) never shows through a command line; the interpreter's own path
    # may, when the checkout itself lives under /tmp (a CI clone)
    assert pytest_named == host_path_named == "False", out
    assert ps_count == "no-ps" or int(ps_count) <= 4, out  # init, worker, ps itself


def test_no_privileges_and_no_stray_file_descriptors(ns_box):
    out = probe(
        ns_box,
        "import os\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "for key in ('CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp'):\n"
        "    print(key, status[key].strip())\n"
        "print('uid', os.getuid())\n"
        "links = {}\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        links[fd] = os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError:\n"
        "        pass\n"
        "print('fds', sorted(set(l.split(':')[0] for l in links.values())))\n",
    )
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    for key in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(lines[key], 16) == 0, out
    assert lines["NoNewPrivs"] == "1" and lines["Seccomp"] == "2"
    assert lines["uid"] != "0" or os.geteuid() != 0  # a root parent's sandbox never runs as uid 0
    # only pipes (the protocol, stdout, stderr), /dev/null and the listing itself: no fd to a host directory
    assert set(ast.literal_eval(lines["fds"])) <= {"pipe", "/dev/null"} | {f"/proc/{n}/fd" for n in range(10)}, out


def test_system_is_read_only_and_dev_is_minimal(box):
    out = probe(
        box,
        "import os\n"
        "for path in ['/usr/bin/evil', '/bin/evil', os.__file__]:\n"
        "    try:\n"
        "        open(path, 'a').write('x'); print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
        "print(sorted(os.listdir('/dev')))\n",
    )
    assert "WROTE" not in out and out.count("refused") == 3
    devices = set(ast.literal_eval(out.splitlines()[-1]))
    assert not devices & {"sda", "vda", "nvme0n1", "mem", "kmem", "kmsg", "port", "fuse", "kvm"}, devices


def test_workspace_writes_persist_and_are_visible_to_the_parent(ns_box):
    ns_box.put_file("in/hello.txt", b"from the parent")
    probe(ns_box, "import os\nos.makedirs('/workspace/out')\n_ = open('/workspace/out/r.txt', 'w').write('hi')")
    assert (ns_box.workspace / "out" / "r.txt").read_text() == "hi"
    assert ns_box.get_file("out/r.txt") == b"hi"
    assert probe(ns_box, "print(open('in/hello.txt').read())") == "from the parent\n"
    digest = hashlib.sha256((ns_box.workspace / "in" / "hello.txt").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(b"from the parent").hexdigest()
