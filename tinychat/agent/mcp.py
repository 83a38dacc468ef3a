"""Model Context Protocol both ways: use an MCP server's tools in the agent, and serve tinychat's tools over MCP.

Why MCP: it is how tool servers (files, browsers, databases, ...) are shared between assistants. As a
client, tinychat turns each tool an MCP server lists into a proxy Tool in a Registry, so the model calls it
like a built-in one (validation and "error: ..." results included). As a server (`tinychat mcp-serve`),
tinychat's own built-ins (calculator, time, workspace files, knowledge-base search) become usable from any
MCP client.

Why a background thread: the MCP SDK is async (anyio), while the agent loop is plain synchronous code. An
McpConnection owns one event loop on one thread for its whole life; the session's task group is entered
and left by the same task there (as anyio requires), and synchronous calls hop onto that loop with
`run_coroutine_threadsafe`. `close()` ends the session, which closes the server's stdin, waits briefly
and kills its process group if it lingers (the SDK's stdio shutdown), then joins the thread.

Written against the official `mcp` SDK 2.x (`mcp.server.lowlevel.Server` with on_* handlers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import jsonschema
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp import types as mcp_types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from tinychat import __version__
from tinychat.agent.builtin import default_registry, make_search_tool
from tinychat.agent.tools import Registry, Tool, ToolError
from tinychat.config import field, help_text, parse_args
from tinychat.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- client
def content_text(result: mcp_types.CallToolResult) -> str:
    """A tool result's text: its text blocks (and embedded text resources); other media as placeholders."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(text := getattr(getattr(block, "resource", None), "text", None), str):  # embedded text
            parts.append(text)
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource: {block.uri}]")
        else:
            parts.append(f"[{block.type}: {getattr(block, 'mime_type', '') or 'binary'}]")
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(parts)


def local_name(remote: str, prefix: str = "") -> str:
    """The registry name of a server's tool: "prefix__tool", reduced to what the OpenAI API accepts."""
    name = f"{prefix}__{remote}" if prefix else remote
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]


def _reason(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    if isinstance(e, MCPError):
        return e.message
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _list_tools(session: ClientSession) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        page = await session.list_tools(params=mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools


class _Link:
    """The event-loop side of a connection: one thread, one loop, one ClientSession from start to end.

    Holds no reference to its McpConnection, so a connection that is dropped without close() is still
    finalized (and its server stopped) by the garbage collector, or at the latest at interpreter exit.
    """

    def __init__(self, params: StdioServerParameters) -> None:
        self.params = params
        self.session: ClientSession | None = None
        self.tools: list[mcp_types.Tool] = []
        self.ready: Future[None] = Future()
        self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)  # no set_event_loop in this thread
        self._loop = self._runner.get_loop()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._serve, name=f"mcp {params.command}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with self._runner:  # on exit: cancels leftover calls, closes the loop
            self._runner.run(self._main())

    async def _main(self) -> None:
        self._task = asyncio.current_task()
        try:
            if self._stop.is_set():
                raise ToolError("closed before it started")
            async with (
                stdio_client(self.params, errlog=sys.__stderr__) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                self.tools = await _list_tools(session)
                self.session = session
                self.ready.set_result(None)
                await self._stop.wait()
        except BaseException as e:  # the thread's last word: hand it to the constructor, or log it
            if not self.ready.done():
                self.ready.set_exception(e)
            elif not isinstance(e, asyncio.CancelledError):
                log.warning("MCP connection to %s ended: %s", self.params.command, _reason(e))
        finally:
            self.session = None

    def _end(self) -> None:
        """(On the loop.) A live session ends cleanly through the stop event; a startup still running is cancelled."""
        self._stop.set()
        if self.session is None and self._task is not None:
            self._task.cancel()

    def submit(self, make: Callable[[ClientSession], Awaitable[T]], timeout: float) -> T:
        session = self.session
        if session is None:
            raise ToolError(f"the MCP server {self.params.command!r} is not connected (closed, or it exited)")

        async def job() -> T:
            return await make(session)

        try:
            fut = asyncio.run_coroutine_threadsafe(job(), self._loop)
        except RuntimeError:  # the loop has just been closed
            raise ToolError(f"the MCP server {self.params.command!r} is not connected") from None
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise ToolError(f"the MCP server did not answer within {timeout:g} s") from None

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has already finished
            self._loop.call_soon_threadsafe(self._end)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=15)


class McpConnection:
    """A synchronous handle on an MCP server run as a subprocess over stdio.

    `command` is the server's argv; `env` is added to the SDK's safe default environment (PATH, HOME, ...).
    Startup problems (no such program, not an MCP server) are UserErrors; a failing call is a ToolError,
    which a Registry turns into an "error: ..." result. Use it as a context manager, or call close().
    """

    def __init__(
        self,
        command: list[str],
        env: dict[str, str] | None = None,
        *,
        cwd: str | Path | None = None,
        timeout: float = 60.0,
        startup_timeout: float = 30.0,
    ) -> None:
        if not command:
            raise UserError("an MCP server needs a command, e.g. ['python', 'server.py'].")
        self.command = list(command)
        self.timeout = timeout
        self._link = _Link(StdioServerParameters(command=command[0], args=command[1:], env=env, cwd=cwd))
        self._finalizer = weakref.finalize(self, self._link.stop)  # close(), garbage collection or exit
        try:
            self._link.ready.result(startup_timeout)
        except BaseException as e:
            self.close()
            why = f"no answer within {startup_timeout:g} s" if isinstance(e, TimeoutError) else _reason(e)
            raise UserError(f"could not start the MCP server {' '.join(self.command)!r}: {why}.") from None

    def list_tools(self) -> list[mcp_types.Tool]:
        """The server's tools as it describes them (listed once, at connection)."""
        return list(self._link.tools)

    def call(self, name: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> str:
        """Call the server's tool `name`: its text content, or ToolError with the server's error text."""
        t = self.timeout if timeout is None else timeout
        try:
            result = self._link.submit(lambda s: s.call_tool(name, args or {}, read_timeout_seconds=t), t + 5)
        except MCPError as e:
            raise ToolError(e.message) from None
        text = content_text(result)
        if result.is_error:  # a Registry adds "error: " itself (tinychat's own server already did)
            raise ToolError(re.sub(r"^error:\s*", "", text, flags=re.I) or f"the MCP tool {name!r} failed")
        return text

    def tools(self, prefix: str = "") -> list[Tool]:
        """A proxy Tool per server tool, named `local_name(tool, prefix)`, its inputSchema as parameters."""
        return [self._proxy(t, prefix) for t in self._link.tools]

    def _proxy(self, remote: mcp_types.Tool, prefix: str) -> Tool:
        def fn(**kwargs: Any) -> str:
            return self.call(remote.name, kwargs)

        desc = remote.description or remote.title or f"the {remote.name} tool of an MCP server"
        return Tool(local_name(remote.name, prefix), desc, dict(remote.input_schema), fn)

    def register(self, registry: Registry, prefix: str = "") -> list[str]:
        """Add every server tool to `registry`; returns the names added (a tool whose schema is broken is skipped)."""
        added = []
        for remote in self._link.tools:
            try:
                added.append(registry.add(self._proxy(remote, prefix)).name)
            except (jsonschema.SchemaError, ValueError) as e:
                log.warning("skipping MCP tool %r of %s: %s", remote.name, self.command[0], e)
        return added

    def close(self) -> None:
        """End the session and the server process, and join the thread; safe to call twice."""
        self._finalizer()

    def __enter__(self) -> McpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- server
def build_server(registry: Registry, name: str = "tinychat") -> Server:
    """A low-level MCP Server whose tools/list and tools/call are the registry's specs and `call`."""

    async def list_tools(ctx: Any, params: Any) -> mcp_types.ListToolsResult:
        tools = [mcp_types.Tool(name=t.name, description=t.description, input_schema=t.parameters) for t in registry]
        return mcp_types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: mcp_types.CallToolRequestParams) -> mcp_types.CallToolResult:
        # A worker thread: tools block (files, a sandbox, a knowledge base) and must not stall the protocol.
        result = await anyio.to_thread.run_sync(registry.call, params.name, params.arguments)
        text = mcp_types.TextContent(type="text", text=result.content)
        return mcp_types.CallToolResult(content=[text], is_error=not result.ok)

    return Server(name, version=__version__, on_list_tools=list_tools, on_call_tool=call_tool)


async def serve_async(registry: Registry, name: str = "tinychat") -> None:
    """Serve `registry` over this process's stdin/stdout until the client closes stdin."""
    server = build_server(registry, name)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def serve(registry: Registry, name: str = "tinychat") -> None:
    """Blocking `serve_async`."""
    anyio.run(serve_async, registry, name)


@dataclass
class McpServeConfig:
    workspace: str = field("", help="folder for the file tools (read_file, write_file, list_files); none if empty")
    kb: str = field("", help="knowledge-base folder to offer as the 'search' tool (made by `tinychat rag ingest`)")
    name: str = field("tinychat", help="the server name MCP clients are told")
    max_chars: int = field(8000, help="tool results longer than this are cut")


def kb_search_tool(kb: str) -> Tool:
    """The "search" tool over the knowledge base in folder `kb`, citing sources as the knowledge base names them."""
    try:
        from tinychat.rag.kb import open_kb
        from tinychat.rag.retrieve import RetrieveConfig
    except ImportError as e:
        raise UserError(f"--kb {kb}: the knowledge base module is not available ({e}).") from None
    base = open_kb(kb)
    t = make_search_tool(lambda q, k: base.retriever.search(q, RetrieveConfig(k=k)), source_name=base.display_name)
    t.on_close = base.close
    return t


def build_registry(cfg: McpServeConfig) -> Registry:
    """The built-in tools `cfg` asks for."""
    if cfg.kb and not Path(cfg.kb).is_dir():
        raise UserError(f"--kb {cfg.kb}: no such folder.")
    if cfg.max_chars < 100:
        raise UserError(f"--max-chars must be at least 100, got {cfg.max_chars}.")
    search = kb_search_tool(cfg.kb) if cfg.kb else None
    registry = default_registry(workspace=cfg.workspace or None, search=search)
    registry.max_chars = cfg.max_chars
    return registry


def run(cfg: McpServeConfig) -> int:
    """`tinychat mcp-serve`: the built-in tools as an MCP server on stdin/stdout (stdout is the protocol's)."""
    with contextlib.redirect_stdout(sys.stderr):  # loading a knowledge base must not print into the protocol
        registry = build_registry(cfg)
    print(f"tinychat MCP server on stdio: {', '.join(registry.names)}", file=sys.stderr)
    with registry:
        serve(registry, cfg.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tinychat.agent.mcp [--workspace DIR] [--kb DIR]`: the same as `tinychat mcp-serve`."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(f"{main.__doc__}\n\noptions:\n{help_text(McpServeConfig)}")
        return 0
    try:
        return run(parse_args(McpServeConfig, argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
