"""The code sandbox's behaviour: a persistent session, captured output and errors, files, restarts, levels.

The escape attempts live in test_sandbox_escape.py. Every test checks that it leaves no process behind: the
test process becomes a child subreaper, so whatever a sandbox started stays its descendant until it is gone.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_procs import alive, no_leftover_processes

from tinychat.agent import sandbox as sandbox_module
from tinychat.agent.cli import AgentConfig, build_registry
from tinychat.agent.sandbox import (
    ALLOW_UNISOLATED_ENV,
    LEVELS,
    Limits,
    RunResult,
    Sandbox,
    available_levels,
    isolation_level,
    require_isolation,
)
from tinychat.errors import UserError

LIMITS = Limits(timeout=10, cpu_seconds=10, memory_bytes=512 << 20, max_processes=32, output_bytes=4096)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    with no_leftover_processes():
        yield


@pytest.fixture(params=available_levels())
def any_level(request) -> str:
    return request.param


def _open(workspace: Path, level: str | None = None, limits: Limits = LIMITS) -> Sandbox:
    if (level or isolation_level()) == "process":  # the opt-in such a machine needs
        with pytest.warns(RuntimeWarning, match="process"):
            return Sandbox(workspace, limits, level=level, allow_unisolated=True)
    return Sandbox(workspace, limits, level=level)


@pytest.fixture
def no_isolation(monkeypatch) -> Iterator[None]:
    """A machine without bwrap and unshare: only the unisolated "process" level is left; no opt-in set."""
    monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    sandbox_module._available.cache_clear()
    yield
    monkeypatch.undo()
    sandbox_module._available.cache_clear()


@pytest.fixture
def box(tmp_path):
    with _open(tmp_path / "ws") as sb:
        yield sb


def test_best_level_is_reported():
    if shutil.which("bwrap"):
        assert isolation_level() == "bubblewrap"
    else:
        assert isolation_level() in ("namespaces", "process")
    assert available_levels()[0] == isolation_level()
    assert available_levels()[-1] == "process"


def test_sandbox_reports_its_level(box):
    assert box.level == isolation_level()
    assert box.level in box.describe()
    if box.level != "process":
        assert box.warnings == []


def test_unknown_or_unavailable_level_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown sandbox level"):
        Sandbox(tmp_path, level="docker")
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    sandbox_module._available.cache_clear()
    try:
        with pytest.raises(UserError, match="not available"):
            Sandbox(tmp_path, level="bubblewrap")
        assert isolation_level() == "process"
    finally:
        monkeypatch.undo()
        sandbox_module._available.cache_clear()


def test_state_persists_between_calls(tmp_path, any_level):
    with _open(tmp_path / "ws", any_level) as sb:
        assert sb.run("import math\nx = 20\ndef double(v):\n    return 2 * v").as_text() == "[no output]"
        r = sb.run("print(double(x) + math.floor(2.5))")
        assert (r.stdout, r.error, r.restarted) == ("42\n", "", False)


def test_last_expression_is_shown_like_a_repl(box):
    assert box.run("1 + 1").stdout == "2\n"
    assert box.run("'a' * 3").stdout == "'aaa'\n"
    assert box.run("None").stdout == ""
    assert box.run("_ * 2").stdout == "'aaaaaa'\n"


def test_exception_is_captured_as_traceback_text(tmp_path, any_level):
    with _open(tmp_path / "ws", any_level) as sb:
        r = sb.run("print('before')\ndef f():\n    return 1 / 0\nf()")
        assert r.stdout == "before\n"
        assert "ZeroDivisionError: division by zero" in r.error
        assert 'File "<cell 1>", line 3, in f' in r.error and "return 1 / 0" in r.error
        assert "_sandbox_worker" not in r.error  # only the user's frames
        assert sb.run("print(f.__name__)").stdout == "f\n"  # the session survived


def test_syntax_error_and_system_exit_keep_the_session(box):
    box.run("keep = 1")
    assert "SyntaxError" in box.run("def broken(:").error
    assert "SystemExit: 3" in box.run("raise SystemExit(3)").error
    assert box.run("keep").stdout == "1\n"


def test_stdout_and_stderr_are_captured(box):
    r = box.run(
        "import os, sys, subprocess\n"
        "print('out'); print('err', file=sys.stderr)\n"
        "sys.stdout.flush(); os.write(1, b'fd1\\n')\n"
        "subprocess.run(['sh', '-c', 'echo child-out; echo child-err >&2'])\n"
        "None"
    )
    assert r.stdout == "out\nfd1\nchild-out\n"
    assert r.stderr == "err\nchild-err\n"
    assert r.as_text() == "out\nfd1\nchild-out\n[stderr]\nerr\nchild-err"


def test_output_is_capped_with_a_marker(box):
    r = box.run("print('x' * 100_000)")
    assert len(r.stdout) < LIMITS.output_bytes + 100
    assert r.stdout.endswith(f"[... truncated {100_001 - LIMITS.output_bytes} bytes]\n")


def test_files_in_and_out(tmp_path, any_level):
    with _open(tmp_path / "ws", any_level) as sb:
        sb.put_file("data/in.txt", b"hello")
        r = sb.run("t = open('data/in.txt').read()\nopen('out.txt', 'w').write(t.upper())\nimport os\nos.getcwd()")
        assert r.error == ""
        assert sb.get_file("out.txt") == b"HELLO"
        assert (sb.workspace / "out.txt").read_bytes() == b"HELLO"
        sb.put_file("data/in.txt", b"again")  # overwrite
        assert sb.run("print(open('data/in.txt').read())").stdout == "again\n"


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "", "a/../../b", "sub/../../x"])
def test_bad_file_names_are_refused(box, name):
    with pytest.raises(UserError):
        box.put_file(name, b"x")
    with pytest.raises(UserError):
        box.get_file(name)


def test_missing_file_and_folder_are_user_errors(box):
    with pytest.raises(UserError):
        box.get_file("nope.txt")
    box.run("import os; os.mkdir('folder')")
    with pytest.raises(UserError, match="not a regular file"):
        box.get_file("folder")


def test_timeout_restarts_the_session(box):
    box.run("x = 1")
    r = box.run("import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.01)", timeout=0.5)
    assert r.timed_out and not r.restarted
    assert r.stdout == "started\n"
    assert 0.5 <= r.duration < 3
    assert "timed out" in r.as_text()
    r = box.run("print('x' in globals())")
    assert r.restarted and r.stdout == "False\n"
    assert "fresh" in r.as_text()
    assert not box.run("1").restarted  # only the first call after the restart says so


def test_crash_is_reported_and_the_next_call_restarts(box):
    r = box.run("import os, sys\nprint('last words')\nsys.stdout.flush()\nos._exit(7)")
    assert r.crashed == "the worker exited with status 7"
    assert r.stdout == "last words\n"
    assert "the session died" in r.as_text()
    r = box.run("print('back')")
    assert r.restarted and r.stdout == "back\n"


@pytest.mark.parametrize("level", [lv for lv in available_levels() if lv != "process"])
def test_code_can_serve_itself_on_loopback(tmp_path, level):
    with _open(tmp_path / "ws", level) as sb:
        r = sb.run(
            "import socket\n"
            "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
            "c = socket.create_connection(srv.getsockname(), timeout=2); c.sendall(b'ping')\n"
            "print(srv.accept()[0].recv(4))"
        )
        assert r.stdout == "b'ping'\n", r.as_text()


def test_limits_and_timeouts_must_be_positive(box):
    with pytest.raises(UserError, match="memory_bytes"):
        Limits(memory_bytes=0)
    with pytest.raises(UserError, match="timeout"):
        box.run("1", timeout=0)


def test_venv_packages_are_importable_read_only(box):
    assert box.run("import numpy\nprint(int(numpy.arange(5).sum()))").stdout == "10\n"
    if box.level != "process":  # there, the code has the parent's rights on the venv
        r = box.run("open(numpy.__file__, 'a')")
        assert "Read-only file system" in r.error or "Permission denied" in r.error


def test_close_is_idempotent_and_kills_everything(tmp_path):
    sb = _open(tmp_path / "ws")
    sb.run("import subprocess\np = subprocess.Popen(['sleep', '60'])")
    pids = sb.host_pids()
    assert len(pids) >= 2
    sb.close()
    sb.close()
    assert sb.host_pids() == []
    assert not [p for p in pids if alive(p)]
    with pytest.raises(UserError, match="closed"):
        sb.run("1")


def test_as_text_orders_its_parts():
    r = RunResult(stdout="a\n", stderr="b\n", error="Traceback\n", restarted=True)
    assert r.as_text().splitlines() == [
        "[note: the previous session died; this ran in a fresh one: earlier variables are gone]",
        "a",
        "[stderr]",
        "b",
        "Traceback",
    ]
    assert RunResult().as_text() == "[no output]"
    assert "timed out after 2.0 s" in RunResult(timed_out=True, duration=2.0).as_text()


def test_process_level_says_loudly_that_it_is_weak(tmp_path):
    with _open(tmp_path / "ws", "process") as sb:
        assert sb.level == "process"
        assert any("NOT isolated" in w or "process" in w for w in sb.warnings)
        assert "WARNING" in sb.describe()
        assert sb.run("print(2 + 2)").stdout == "4\n"


def test_levels_constant():
    assert LEVELS == ("bubblewrap", "namespaces", "process")


def test_no_isolation_is_refused_without_an_opt_in(tmp_path, no_isolation):
    assert isolation_level() == "process"
    for attempt in (require_isolation, lambda: Sandbox(tmp_path / "ws", LIMITS)):
        with pytest.raises(UserError, match=r"cannot isolate.*apt-get install bubblewrap.*allow-unisolated"):
            attempt()
    with pytest.raises(UserError, match="not isolated: pass allow_unisolated=True"):
        Sandbox(tmp_path / "ws", LIMITS, level="process")


def test_unisolated_runs_only_on_an_explicit_opt_in(tmp_path, no_isolation, monkeypatch):
    with (
        pytest.warns(RuntimeWarning, match="NOT isolated"),
        Sandbox(tmp_path / "a", LIMITS, allow_unisolated=True) as sb,
    ):
        assert sb.level == "process" and sb.run("print(6 * 7)").stdout == "42\n"
    monkeypatch.setenv(ALLOW_UNISOLATED_ENV, "1")
    assert require_isolation() == "process"
    with pytest.warns(RuntimeWarning, match="NOT isolated"), Sandbox(tmp_path / "b", LIMITS) as sb:
        assert sb.level == "process"
    with pytest.raises(UserError, match="apt-get install bubblewrap"):  # an explicit False beats the environment
        Sandbox(tmp_path / "c", LIMITS, allow_unisolated=False)


def test_agent_refuses_the_python_tool_without_isolation_unless_allowed(tmp_path, no_isolation):
    ws = str(tmp_path / "ws")
    with contextlib.ExitStack() as stack, pytest.raises(UserError, match="apt-get install bubblewrap"):
        build_registry(AgentConfig(task="x", workspace=ws), stack)
    with contextlib.ExitStack() as stack:  # no python tool, nothing to refuse
        assert "python" not in build_registry(AgentConfig(task="x", workspace=ws, python=False), stack)[0].names
    with contextlib.ExitStack() as stack:
        reg, _ = build_registry(AgentConfig(task="x", workspace=ws, allow_unisolated=True), stack)
        with pytest.warns(RuntimeWarning, match="NOT isolated"):
            assert reg.call("python", {"code": "print(1 + 1)"}).content == "2"


@pytest.mark.skipif(
    "bubblewrap" not in sandbox_module.available_levels(), reason="without bubblewrap the sandbox refuses earlier"
)
def test_unknown_architecture_without_seccomp_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    sandbox_module._available.cache_clear()
    try:
        with pytest.raises(UserError, match="no seccomp filter for the CPU architecture 'riscv64'.*allow-unisolated"):
            Sandbox(tmp_path / "ws", LIMITS)
    finally:
        monkeypatch.undo()
        sandbox_module._available.cache_clear()


@pytest.mark.skipif(isolation_level() == "process", reason="needs a level that isolates")
def test_a_worker_without_seccomp_is_refused_unless_allowed(tmp_path, monkeypatch):
    """The parent's architecture check has a backstop: the worker reports whether it installed the filter."""
    monkeypatch.delenv(ALLOW_UNISOLATED_ENV, raising=False)
    source = sandbox_module._WORKER.read_text()
    worker = tmp_path / "worker.py"
    worker.write_text(
        source.replace(
            '\nif __name__ == "__main__":',
            '\n_seccomp_program = lambda block_network: None\n\nif __name__ == "__main__":',
        )
    )
    monkeypatch.setattr(sandbox_module, "_WORKER", worker)
    with pytest.raises(UserError, match="no seccomp filter"):
        Sandbox(tmp_path / "a", LIMITS)
    with pytest.warns(RuntimeWarning, match="no seccomp"), Sandbox(tmp_path / "b", LIMITS, allow_unisolated=True) as sb:
        assert sb.run("print(3)").stdout == "3\n"
