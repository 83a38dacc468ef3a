"""The tool registry and the built-in tools: schemas from signatures, calls that fail into results, confinement."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Literal, Optional

import pytest

from tinychat.agent.builtin import (
    calculator,
    current_time,
    default_registry,
    make_file_tools,
    make_python_tool,
    make_search_tool,
)
from tinychat.agent.evaluate import AgentEvalConfig
from tinychat.agent.tools import Registry, Tool, ToolError, parse_docstring, tool
from tinychat.rag.types import ChunkRecord, Hit
from tinychat.world.arith import CALCULATOR_TOOL
from tinychat.world.evalsets import SEARCH_TOOL
from tinychat.world.kb import KbDoc, search_result


class Unit(Enum):
    C = "celsius"
    F = "fahrenheit"


@tool
def weather(
    city: str,
    days: int = 1,
    unit: Literal["c", "f"] = "c",
    hours: list[int] | None = None,
    detail: Optional[bool] = None,  # noqa: UP045 - Optional is part of what is tested
    scale: float = 1.0,
    note: str | None = None,
    temp_unit: Unit = Unit.C,
    extra: dict | None = None,
) -> dict:
    """Forecast the weather for a city.

    This second paragraph is not part of the description.

    Args:
        city: the city's name,
            in English.
        days (int): how many days ahead
        unit: c or f
    Returns:
        the forecast
    """
    return {"city": city, "days": days, "note": note, "temp_unit": temp_unit.name}


def props() -> dict:
    return weather.parameters["properties"]


# ---------------------------------------------------------------------------------------------- schemas
def test_schema_types_and_required():
    p = weather.parameters
    assert p["type"] == "object" and p["additionalProperties"] is False
    assert p["required"] == ["city"]
    assert props()["city"]["type"] == "string"
    assert props()["days"] == {"type": "integer", "description": "how many days ahead", "default": 1}
    assert props()["scale"] == {"type": "number", "default": 1.0}
    assert props()["extra"]["type"] == ["object", "null"]


def test_schema_literal_enum_optional_list():
    assert props()["unit"]["enum"] == ["c", "f"] and props()["unit"]["type"] == "string"
    assert props()["hours"] == {"type": ["array", "null"], "items": {"type": "integer"}, "default": None}
    assert props()["detail"]["type"] == ["boolean", "null"]
    assert props()["note"]["type"] == ["string", "null"] and "note" not in weather.parameters["required"]
    assert props()["temp_unit"] == {"enum": ["celsius", "fahrenheit"], "type": "string", "default": "celsius"}


def test_descriptions_from_docstring():
    assert weather.description == "Forecast the weather for a city."
    assert props()["city"]["description"] == "the city's name, in English."
    assert "description" not in props()["hours"]
    assert weather.spec() == {
        "type": "function",
        "function": {"name": "weather", "description": weather.description, "parameters": weather.parameters},
    }
    summary, args = parse_docstring("Line one\ncontinues.\n\nArgs:\n    x: the x\nRaises:\n    y: not an arg")
    assert summary == "Line one continues." and args == {"x": "the x"}


def test_decorator_options_and_still_callable():
    @tool(name="shout", description="Upper-case a word.")
    def f(word: str) -> str:
        return word.upper()

    assert isinstance(f, Tool) and f.name == "shout" and f.description == "Upper-case a word."
    assert f("hi") == "HI"


def test_optional_without_default_is_passed_none_and_enum_converted():
    @tool
    def f(a: int | None, u: Unit | None = None) -> str:
        return f"{a} {u}"

    assert f.parameters["required"] == []
    assert Registry([f]).call("f", {"u": "fahrenheit"}).content == "None Unit.F"
    assert f(3, Unit.C) == "3 Unit.C" and f(a=4) == "4 None"  # still callable from Python


def _no_hint(x):  # noqa: ANN001, ANN202
    return x


def _tuple(x: tuple[int, int]) -> None: ...
def _set(x: set[str]) -> None: ...
def _path(x: Path) -> None: ...
def _int_keys(x: dict[int, str]) -> None: ...
def _varargs(*xs: int) -> None: ...
def _kwargs(**kw: int) -> None: ...


@pytest.mark.parametrize("fn", [_no_hint, _tuple, _set, _path, _int_keys, _varargs, _kwargs])
def test_unsupported_annotation_is_a_type_error_at_decoration(fn):
    with pytest.raises(TypeError):
        tool(fn)


def test_bad_names_and_duplicates_are_programming_errors():
    with pytest.raises(ValueError):
        tool(calculator.fn, name="has space")
    reg = Registry([calculator])
    with pytest.raises(ValueError, match="already registered"):
        reg.add(calculator)


# ---------------------------------------------------------------------------------------------- calls
@pytest.fixture
def reg() -> Registry:
    return Registry([weather])


def test_call_ok_with_string_or_dict_arguments(reg):
    r = reg.call("weather", '{"city": "Paris", "days": 2}')
    assert r.ok and json.loads(r.content) == {"city": "Paris", "days": 2, "note": None, "temp_unit": "C"}
    assert r.seconds >= 0
    assert reg.call("weather", {"city": "Oslo", "temp_unit": "fahrenheit"}).content.endswith('"F"}')


def test_quoted_numbers_are_coerced_only_when_unambiguous(reg):
    assert json.loads(reg.call("weather", {"city": "x", "days": "3"}).content)["days"] == 3
    assert json.loads(reg.call("weather", {"city": "x", "days": 3.0}).content)["days"] == 3
    assert reg.call("weather", {"city": "x", "days": "3.5"}).content == "error: argument 'days' must be integer"
    assert reg.call("weather", {"city": "x", "days": "three"}).ok is False
    assert reg.call("weather", {"city": 5}).content == "error: argument 'city' must be string"  # no str() either


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("{}", "error: argument 'city' is required"),
        ('{"city": "x", "days": "soon"}', "error: argument 'days' must be integer"),
        ('{"city": "x", "hours": [1, "two"]}', "error: argument 'hours[1]' must be integer"),
        ('{"city": "x", "unit": "k"}', 'error: argument \'unit\' must be one of: "c", "f"'),
        ('{"city": "x", "when": "now"}', "error: unknown argument 'when'; expected: city, days, unit"),
        ('["Paris"]', "error: arguments must be a JSON object"),
        ('{"city": "Paris"', "error: arguments are not valid JSON"),
    ],
)
def test_validation_errors_become_results(reg, arguments, message):
    r = reg.call("weather", arguments)
    assert not r.ok and r.content.startswith(message), r.content
    assert "\n" not in r.content


def test_unknown_tool(reg):
    r = reg.call("wether", {"city": "x"})
    assert not r.ok and r.content == "error: unknown tool 'wether'; available tools: weather"


def test_empty_arguments_mean_none():
    reg = Registry([current_time])
    assert all(reg.call("current_time", a).ok for a in ("", "null", None, {}))


def test_tool_exceptions_become_results():
    @tool
    def boom(kind: str) -> str:
        """Fails."""
        if kind == "value":
            raise ValueError("bad value")
        if kind == "tool":
            raise ToolError("try again")
        raise RuntimeError("crash")

    reg = Registry([boom])
    r = reg.call("boom", {"kind": "value"})
    assert r.ok is False and r.content == "error: bad value"
    assert reg.call("boom", {"kind": "tool"}).content == "error: try again"
    assert reg.call("boom", {"kind": "other"}).content == "error: RuntimeError: crash"


def test_results_are_text_and_capped():
    @tool
    def big(n: int) -> str:
        """n characters."""
        return "x" * n

    @tool
    def data() -> list:
        """JSON."""
        return [{"a": 1}, "é"]

    reg = Registry([big, data], max_chars=100)
    assert reg.call("big", {"n": 100}).content == "x" * 100
    r = reg.call("big", {"n": 1000})
    assert r.ok and r.content.startswith("x" * 100 + "\n[... truncated: 900 more characters]")
    assert reg.call("data", {}).content == '[{"a": 1}, "é"]'


# ---------------------------------------------------------------------------------------------- built-ins
def test_calculator_matches_the_trained_spec():
    assert calculator.spec() == CALCULATOR_TOOL  # the prompt the model is trained on is the one it is served
    reg = Registry([calculator])
    assert reg.call("calculator", '{"expression": "17 * 23"}').content == "391"
    assert reg.call("calculator", {"expression": "(12 + 7) * 3 / 2"}).content == "28.5"
    for evil in ("__import__('os').system('true')", "2 ** 10", "1 / 0"):
        r = reg.call("calculator", {"expression": evil})
        assert not r.ok and r.content.startswith("error: ")


def test_current_time():
    reg = Registry([current_time])
    utc = datetime.fromisoformat(reg.call("current_time", {}).content)
    assert utc.utcoffset() == timedelta(0)
    assert abs((datetime.now(utc.tzinfo) - utc).total_seconds()) < 5
    assert datetime.fromisoformat(reg.call("current_time", {"timezone": "Asia/Shanghai"}).content).utcoffset() == (
        timedelta(hours=8)
    )
    for bad in ("Mars/Olympus", "../../etc/passwd"):
        r = reg.call("current_time", {"timezone": bad})
        assert not r.ok and r.content.startswith("error: unknown time zone")


def _hit(source: str, text: str, rank: int) -> Hit:
    rec = ChunkRecord(f"id{rank}", source, "title", "", 0, 0, len(text), text, "hash")
    return Hit(rec, score=1.0 / rank, rank=rank)


def test_search_tool_formats_passages_like_the_sft_data():
    asked = []

    def search(query: str, k: int) -> list[Hit]:
        asked.append((query, k))
        return [_hit("kb/en/alice.md", "Alice was born in Lyon.\n", 1), _hit("kb/en/bob.md", "  Bob is a baker.", 2)]

    t = make_search_tool(search)
    fn = t.spec()["function"]
    assert fn["name"] == SEARCH_TOOL["function"]["name"] == "search"
    assert fn["parameters"]["required"] == SEARCH_TOOL["function"]["parameters"]["required"] == ["query"]
    assert fn["parameters"]["properties"]["k"]["default"] == 4
    # at the agent eval's k the schema in the model's prompt is the one its training rows show
    assert make_search_tool(search, default_k=AgentEvalConfig().search_k).spec() == SEARCH_TOOL
    reg = Registry([t])
    r = reg.call("search", {"query": "Alice"})
    want = "[1] source: kb/en/alice.md\nAlice was born in Lyon.\n\n[2] source: kb/en/bob.md\nBob is a baker."
    assert r.content == want
    # tinyworld's agent rows format their hits with a twin of format_hits (world/ cannot import agent/)
    hits = [("kb/en/alice.md", "Alice was born in Lyon.\n"), ("kb/en/bob.md", "  Bob is a baker.")]
    assert search_result([(KbDoc(path, "en", text), text) for path, text in hits]) == want
    reg.call("search", {"query": "Bob", "k": 500})
    assert asked == [("Alice", 4), ("Bob", 20)]


def test_search_tool_empty_and_renamed():
    t = make_search_tool(lambda q, k: [], name="kb_search")
    reg = Registry([t])
    assert reg.call("kb_search", {"query": "nothing"}).content == "no results for 'nothing'"
    assert not reg.call("kb_search", {"query": "  "}).ok
    hits = [_hit("/abs/docs/a.md", "A.", 1), _hit("/abs/docs/b.md", "B.", 2)]
    cited = make_search_tool(lambda q, k: hits[:k], source_name=lambda s: Path(s).name, default_k=1)
    assert cited.parameters["properties"]["k"]["default"] == 1
    assert Registry([cited]).call("search", {"query": "a"}).content == "[1] source: a.md\nA."


# ---------------------------------------------------------------------------------------------- files
@pytest.fixture
def files(tmp_path: Path) -> tuple[Registry, Path]:
    ws = tmp_path / "ws"
    return Registry(make_file_tools(ws, max_read=1000)), ws


def test_file_tools_round_trip(files):
    reg, ws = files
    assert reg.call("write_file", {"path": "notes/todo.txt", "content": "milk\n"}).content == (
        "wrote 5 bytes to notes/todo.txt"
    )
    assert (ws / "notes" / "todo.txt").read_text() == "milk\n"
    assert reg.call("read_file", {"path": "notes/todo.txt"}).content == "milk\n"
    assert reg.call("list_files", {}).content == "notes/"
    assert reg.call("list_files", {"path": "notes"}).content == "todo.txt  (5 bytes)"
    assert reg.call("read_file", {"path": "nope.txt"}).content == "error: no such file: 'nope.txt'"
    assert "directory" in reg.call("read_file", {"path": "notes"}).content


@pytest.mark.parametrize("path", ["../outside.txt", "notes/../../outside.txt", "/etc/passwd", "", "a\x00b"])
def test_file_tools_refuse_paths_leaving_the_workspace(files, path):
    reg, ws = files
    for name, args in (("read_file", {"path": path}), ("write_file", {"path": path, "content": "x"})):
        r = reg.call(name, args)
        assert not r.ok and r.content.startswith("error: "), (name, path, r.content)
    assert not (ws.parent / "outside.txt").exists()


def test_file_tools_do_not_follow_symlinks_out(files, tmp_path):
    reg, ws = files
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    os.symlink(secret, ws / "link.txt")
    os.symlink(tmp_path, ws / "up")
    for name, args in (
        ("read_file", {"path": "link.txt"}),
        ("write_file", {"path": "link.txt", "content": "overwritten"}),
        ("read_file", {"path": "up/secret.txt"}),
        ("write_file", {"path": "up/new.txt", "content": "x"}),
        ("list_files", {"path": "up"}),
    ):
        r = reg.call(name, args)
        assert not r.ok and "outside the workspace" in r.content, (name, r.content)
    assert secret.read_text() == "password" and not (tmp_path / "new.txt").exists()


def test_file_tools_size_caps(files, tmp_path):
    reg, ws = files
    (ws / "big.txt").write_text("a" * 5000)
    r = reg.call("read_file", {"path": "big.txt"})
    assert r.ok and r.content.startswith("a" * 1000) and "the file has 5000 bytes" in r.content
    assert len(r.content) < 1200
    (ws / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert "binary" in reg.call("read_file", {"path": "blob.bin"}).content
    small = Registry(make_file_tools(tmp_path / "ws2", max_write=10))
    assert small.call("write_file", {"path": "a.txt", "content": "x" * 11}).content.startswith("error: content is 11")


# ---------------------------------------------------------------------------------------------- wiring
class FakeSandbox:
    made = 0

    def __init__(self) -> None:
        FakeSandbox.made += 1
        self.closed = False
        self.runs: list[tuple[str, float | None]] = []

    def run(self, code: str, timeout: float | None) -> FakeSandbox:
        self.runs.append((code, timeout))
        return self

    def as_text(self) -> str:
        return f"ran {self.runs[-1][0]!r}"

    def close(self) -> None:
        self.closed = True


def test_python_tool_creates_its_sandbox_lazily_once_and_closes_it(tmp_path):
    FakeSandbox.made = 0
    boxes: list[FakeSandbox] = []

    def factory() -> FakeSandbox:
        boxes.append(FakeSandbox())
        return boxes[-1]

    with default_registry(workspace=tmp_path, search=lambda q, k: [], sandbox_factory=factory) as reg:
        assert reg.names == ["calculator", "current_time", "search", "read_file", "write_file", "list_files", "python"]
        assert FakeSandbox.made == 0
        assert reg.call("python", {"code": "print(1)"}).content == "ran 'print(1)'"
        assert reg.call("python", {"code": "x = 2"}).ok
        assert FakeSandbox.made == 1 and len(boxes[0].runs) == 2
    assert boxes[0].closed
    assert make_python_tool(factory).spec()["function"]["parameters"]["required"] == ["code"]


def test_default_registry_minimal():
    reg = default_registry()
    assert reg.names == ["calculator", "current_time"]
    assert [s["function"]["name"] for s in reg.specs()] == reg.names
    assert reg.get("calculator") is calculator and reg.get("python") is None
