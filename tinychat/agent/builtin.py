"""The tools tinychat's agent ships with: calculator, knowledge-base search, Python, workspace files, time.

Why factories: search needs a knowledge base, Python a sandbox, the file tools a workspace directory;
each factory closes over its context and returns ready Tools, and `default_registry` adds whichever of
them the caller can provide.

Why these exact names: tinyworld's SFT data (tinychat/world/sft.py) teaches the model to call
`calculator` with {"expression"} and `search` with {"query"}, and shows search results as numbered
passages "[1] source: PATH\\nTEXT". The built-ins keep those names, arguments and shapes, so what the
trained model does by habit is what works.

Why the file tools are strict about paths: the paths come from model output. Anything absolute, with a
".." part, or that resolves (following symlinks) outside the workspace is refused before any I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tinychat.agent.calculator import calculate
from tinychat.agent.tools import Registry, Tool, ToolError, tool

if TYPE_CHECKING:
    from tinychat.rag.types import Hit

MAX_K = 20  # passages one search may return
READ_LIMIT = 64_000  # bytes read_file shows at most (the registry's cap then applies too)
WRITE_LIMIT = 1_000_000  # bytes write_file accepts
LIST_LIMIT = 200  # entries list_files shows at most


@tool(name="calculator")
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses and return the exact result.

    Args:
        expression: for example: 17 * 23
    """
    return calculate(expression)  # an AST walker, never eval(); CalculatorError is a ValueError


@tool(name="current_time")
def current_time(timezone: str = "UTC") -> str:
    """The current date and time, in ISO 8601 (e.g. 2025-01-31T14:05:09+01:00).

    Args:
        timezone: an IANA time zone name such as UTC, Europe/Paris or Asia/Shanghai
    """
    if timezone.upper() in ("UTC", "Z"):  # no tz database needed
        return datetime.now(UTC).isoformat(timespec="seconds")
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {timezone!r}; use an IANA name such as UTC or Europe/Paris") from None
    return datetime.now(tz).isoformat(timespec="seconds")


def format_hits(hits: list[Hit], source_name: Callable[[str], str] = str) -> str:
    """Numbered passages as in tinyworld's SFT data: "[1] source: PATH\\nTEXT", separated by blank lines."""
    return "\n\n".join(
        f"[{i}] source: {source_name(h.record.source)}\n{h.record.text.strip()}" for i, h in enumerate(hits, 1)
    )


def make_search_tool(
    search: Callable[[str, int], list[Hit]],
    name: str = "search",
    source_name: Callable[[str], str] = str,
    default_k: int = 4,
) -> Tool:
    """A knowledge-base search tool over `search(query, k)`.

    `source_name` turns a hit's source into its citation (e.g. a path relative to the ingested folder);
    `default_k` is the number of passages when the model does not say (the trained model never does).
    """

    def run(query: str, k: int = default_k) -> str:
        """Search the knowledge base and return the most relevant passages with their sources.

        Args:
            query: what to look for
            k: how many passages to return (1 to 20)
        """
        if not query.strip():
            raise ToolError("query is empty: say what to look for")
        hits = search(query, max(1, min(k, MAX_K)))
        return format_hits(hits, source_name) if hits else f"no results for {query!r}"

    return tool(run, name=name)


def make_python_tool(sandbox_factory: Callable[[], Any], timeout: float | None = None) -> Tool:
    """A "python" tool running code in a sandbox made on first use (`Sandbox.run(code, timeout).as_text()`)."""
    box: Any = None
    lock = threading.Lock()  # one sandbox, one run at a time

    def python(code: str) -> str:
        """Run Python code in a sandbox and return its output: what it printed, and the error if it failed.

        Args:
            code: a Python program; use print() to show results
        """
        nonlocal box
        with lock:
            if box is None:
                box = sandbox_factory()
            return box.run(code, timeout=timeout).as_text()

    def close() -> None:
        nonlocal box
        with lock:
            if box is not None:
                box.close()
                box = None

    t = tool(python)
    t.on_close = close
    return t


def _resolve(root: Path, path: str) -> Path:
    """`path` inside the workspace `root` (already resolved), or a ToolError saying why not."""
    if not path or "\x00" in path:
        raise ToolError("path must be a non-empty relative path such as notes.txt")
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or Path(path).is_absolute():
        raise ToolError(f"path {path!r} is absolute; give a path relative to the workspace")
    if ".." in pure.parts:
        raise ToolError(f"path {path!r} contains '..'; paths must stay inside the workspace")
    full = (root / pure).resolve()  # follows symlinks: a link pointing outside is caught below
    if not full.is_relative_to(root):
        raise ToolError(f"path {path!r} leads outside the workspace")
    return full


def make_file_tools(
    workspace: Path | str, max_read: int = READ_LIMIT, max_write: int = WRITE_LIMIT, max_entries: int = LIST_LIMIT
) -> list[Tool]:
    """read_file, write_file and list_files, confined to `workspace` (created if missing)."""
    root = Path(workspace)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()

    def read_file(path: str) -> str:
        """Read a text file from the workspace.

        Args:
            path: the file's path relative to the workspace, e.g. notes/todo.txt
        """
        full = _resolve(root, path)
        if full.is_dir():
            raise ToolError(f"{path!r} is a directory; use list_files to see what it holds")
        if not full.is_file():
            raise ToolError(f"no such file: {path!r}")
        size = full.stat().st_size
        with full.open("rb") as f:
            data = f.read(max_read)
        if b"\x00" in data:
            raise ToolError(f"{path!r} is a binary file, not text")
        text = data.decode("utf-8", errors="replace")
        if size > max_read:
            text += f"\n[... truncated: the file has {size} bytes, only the first {max_read} are shown]"
        return text

    def write_file(path: str, content: str) -> str:
        """Write a text file in the workspace, replacing it if it exists (folders are created as needed).

        Args:
            path: the file's path relative to the workspace, e.g. notes/todo.txt
            content: the whole new content of the file
        """
        data = content.encode("utf-8")
        if len(data) > max_write:
            raise ToolError(f"content is {len(data)} bytes; the limit is {max_write}")
        full = _resolve(root, path)
        if full.is_dir():
            raise ToolError(f"{path!r} is a directory")
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_bytes(data)
        return f"wrote {len(data)} bytes to {full.relative_to(root).as_posix()}"

    def list_files(path: str = ".") -> str:
        """List a folder of the workspace: one entry per line, folders ending in "/", files with their size.

        Args:
            path: the folder relative to the workspace; "." is the workspace itself
        """
        full = root if path in ("", ".", "./") else _resolve(root, path)
        if not full.is_dir():
            raise ToolError(f"no such folder: {path!r}")
        entries = sorted(full.iterdir(), key=lambda p: p.name)
        lines = [f"{p.name}/" if p.is_dir() else f"{p.name}  ({_size(p)} bytes)" for p in entries[:max_entries]]
        if len(entries) > max_entries:
            lines.append(f"[... and {len(entries) - max_entries} more entries]")
        return "\n".join(lines) or "(empty folder)"

    return [tool(read_file), tool(write_file), tool(list_files)]


def _size(p: Path) -> int | str:
    try:
        return p.stat().st_size
    except OSError:  # a dangling symlink
        return "?"


def default_registry(
    workspace: Path | str | None = None,
    search: Callable[[str, int], list[Hit]] | Tool | None = None,
    sandbox_factory: Callable[[], Any] | None = None,
) -> Registry:
    """calculator and current_time, plus search, file tools and python when their context is given.

    `search` is a search function (made into the "search" tool) or a ready Tool (e.g. one with citations).
    """
    reg = Registry([calculator, current_time])
    if search is not None:
        reg.add(search if isinstance(search, Tool) else make_search_tool(search))
    if workspace is not None:
        for t in make_file_tools(workspace):
            reg.add(t)
    if sandbox_factory is not None:
        reg.add(make_python_tool(sandbox_factory))
    return reg
