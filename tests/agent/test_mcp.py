"""MCP both ways, over real stdio subprocesses: a third-party server's tools in a Registry, and tinychat's server."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
from mcp import types as mcp_types

from tinychat.agent.mcp import McpConnection, McpServeConfig, build_registry, content_text, local_name
from tinychat.agent.tools import Registry, ToolError
from tinychat.errors import UserError

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}  # the SDK passes servers only a few safe variables; tinychat must import

SERVER = """
import os, sys
from mcp.server.mcpserver import MCPServer

app = MCPServer("adder")


@app.tool()
def add(a: int, b: int) -> int:
    \"\"\"Add two integers.\"\"\"
    return a + b


@app.tool()
def explode(why: str) -> str:
    \"\"\"Always fails.\"\"\"
    raise RuntimeError(why)


if __name__ == "__main__":
    open(sys.argv[1], "w").write(str(os.getpid()))
    app.run()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited


def _mcp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mcp ")]


@pytest.fixture
def adder(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "adder.py"
    script.write_text(textwrap.dedent(SERVER))
    return [sys.executable, str(script), str(tmp_path / "pid")], tmp_path / "pid"


def test_third_party_server_round_trip(adder):
    command, pid_file = adder
    with McpConnection(command) as conn:
        assert [t.name for t in conn.list_tools()] == ["add", "explode"]
        assert conn.call("add", {"a": 2, "b": 3}) == "5"
        with pytest.raises(ToolError):  # the server's own validation, reached by calling around the registry
            conn.call("add", {"a": 2, "b": "three"})
        with pytest.raises(ToolError, match="nope"):
            conn.call("nope", {})

        reg = Registry()
        assert conn.register(reg, prefix="math") == ["math__add", "math__explode"]
        spec = reg.get("math__add").spec()["function"]
        assert spec["description"] == "Add two integers." and spec["parameters"]["required"] == ["a", "b"]
        assert reg.call("math__add", '{"a": 40, "b": 2}').content == "42"
        assert reg.call("math__add", '{"a": 40, "b": "two"}').content == "error: argument 'b' must be integer"
        assert reg.call("math__add", {"a": 1}).content == "error: argument 'b' is required"
        failed = reg.call("math__explode", {"why": "boom"})
        assert not failed.ok and failed.content.startswith("error: ")
        pid = int(pid_file.read_text())
        assert _alive(pid) and _mcp_threads()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the server outlived close()"
    assert not _mcp_threads(), "the connection's thread outlived close()"
    r = reg.call("math__add", {"a": 1, "b": 2})
    assert not r.ok and "not connected" in r.content
    conn.close()  # twice is fine


def test_tinychat_server_round_trip(tmp_path):
    ws = tmp_path / "ws"
    command = [sys.executable, "-m", "tinychat.agent.mcp", "--workspace", str(ws)]
    with McpConnection(command, env=ENV, cwd=REPO) as conn:
        reg = Registry()
        conn.register(reg)
        assert reg.names == ["calculator", "current_time", "read_file", "write_file", "list_files"]
        assert reg.get("calculator").parameters["required"] == ["expression"]
        assert reg.call("calculator", {"expression": "17 * 23"}).content == "391"
        assert reg.call("calculator", {"expression": "1 / 0"}).content == "error: division by zero"
        assert reg.call("write_file", {"path": "a.txt", "content": "hi"}).ok
        assert (ws / "a.txt").read_text() == "hi"
        escape = reg.call("read_file", {"path": "../secret"})
        assert not escape.ok and "'..'" in escape.content
    assert not _mcp_threads()


def test_startup_failures_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="could not start"):
        McpConnection([str(tmp_path / "no-such-program")])
    with pytest.raises(UserError, match="could not start"):
        McpConnection([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(UserError):
        McpConnection([])
    assert not _mcp_threads()


def test_content_text():
    embedded = mcp_types.TextResourceContents(uri="file:///x", text="b")
    result = mcp_types.CallToolResult(
        content=[
            mcp_types.TextContent(type="text", text="a"),
            mcp_types.EmbeddedResource(type="resource", resource=embedded),
            mcp_types.ImageContent(type="image", data="AA==", mime_type="image/png"),
        ]
    )
    assert content_text(result) == "a\nb\n[image: image/png]"
    assert content_text(mcp_types.CallToolResult(content=[], structured_content={"x": 1})) == '{"x": 1}'


def test_local_names():
    assert local_name("add") == "add"
    assert local_name("read.file/v2", "fs") == "fs__read_file_v2"
    assert len(local_name("x" * 100, "p")) == 64


def test_serve_config_checks_and_kb_hook(tmp_path, monkeypatch):
    assert build_registry(McpServeConfig()).names == ["calculator", "current_time"]
    with pytest.raises(UserError, match="no such folder"):
        build_registry(McpServeConfig(kb=str(tmp_path / "missing")))

    monkeypatch.setitem(sys.modules, "tinychat.rag.kb", None)  # as if the module did not exist
    with pytest.raises(UserError, match="knowledge base module is not available"):
        build_registry(McpServeConfig(kb=str(tmp_path)))


def test_kb_hook_wires_search(tmp_path, monkeypatch):
    from tinychat.rag.types import ChunkRecord, Hit

    record = ChunkRecord("id", "/docs/guide/a.md", "A", "", 0, 0, 5, "Alpha", "h")

    class FakeKb:
        closed = False

        def __init__(self) -> None:
            self.retriever = types.SimpleNamespace(search=lambda q, cfg: [Hit(record, 1.0)][: cfg.k])

        def display_name(self, source: str) -> str:
            return source.removeprefix("/docs/")

        def close(self) -> None:
            FakeKb.closed = True

    fake_kb = types.ModuleType("tinychat.rag.kb")
    fake_kb.open_kb = lambda path: FakeKb()
    fake_retrieve = types.ModuleType("tinychat.rag.retrieve")
    fake_retrieve.RetrieveConfig = lambda k: types.SimpleNamespace(k=k)
    monkeypatch.setitem(sys.modules, "tinychat.rag.kb", fake_kb)
    monkeypatch.setitem(sys.modules, "tinychat.rag.retrieve", fake_retrieve)
    with build_registry(McpServeConfig(kb=str(tmp_path))) as reg:
        assert reg.names == ["calculator", "current_time", "search"]
        assert reg.call("search", {"query": "alpha"}).content == "[1] source: guide/a.md\nAlpha"
    assert FakeKb.closed
