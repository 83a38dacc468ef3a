"""One configuration system for every command: plain dataclasses, TOML presets, dotted CLI overrides.

Why one mechanism: a user who learned `--model.n_layer 8` for pretraining can use the same spelling
for SFT, serving or the speedrun, a run directory's config.toml can be fed back with `--config`, and
an unknown key is an error everywhere instead of a silently ignored typo.

A command's options are a dataclass whose fields may themselves be dataclasses (sections). Values
come, in increasing priority, from the dataclass defaults, a TOML file (`--config FILE`), and
command-line flags. Flags accept `--section.field value`, `--field value`, dashes or underscores
(`--vocab-size` == `--vocab_size`), several values for list fields (`--input a.txt b/`), and a bare
`--flag` for booleans. A field with metadata {"positional": True} is filled from positional words.
"""

from __future__ import annotations

import dataclasses
import keyword
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from tinychat.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration value, key or file is wrong; the message names it and says what was expected."""


def field(default: Any = dataclasses.MISSING, *, help: str = "", positional: bool = False, **kw: Any) -> Any:
    """A dataclass field with a help string (shown by --help) and an optional positional flag."""
    meta = {"help": help, "positional": positional}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_none(value: Any) -> bool:
    """None in TOML's absence or on the command line (`--seed none`)."""
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null"))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a TOML value or a command-line string to the field's declared type, or raise ConfigError."""
    tp, optional = _unwrap_optional(tp)
    if optional and _is_none(value):
        return None
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. int | list[int] | None: the first member that takes it
        members = get_args(tp)
        if _is_none(value) and type(None) in members:
            return None
        for member in (m for m in members if m is not type(None)):
            try:
                return coerce(value, member, name)
            except ConfigError:
                continue
        kinds = " or ".join("none" if m is type(None) else getattr(m, "__name__", str(m)) for m in members)
        raise ConfigError(f"{name} must be {kinds}, got {value!r}.")
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
            return value
        if origin is list:
            (item_tp,) = get_args(tp) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            if not isinstance(value, list | tuple):
                raise ConfigError(f"{name} must be a list, got {value!r}.")
            return [coerce(v, item_tp, name) for v in value]
        if origin is dict:
            if isinstance(value, str):  # a TOML inline table on the command line: --chat_weights '{"*" = 2}'
                try:
                    value = tomllib.loads(f"value = {value}")["value"]
                except tomllib.TOMLDecodeError:
                    raise ConfigError(f"{name} must be a TOML table such as {{a = 1}}, got {value!r}.") from None
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a table, got {value!r}.")
            return dict(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name} must be true or false, got {value!r}.")
        if tp is int:
            if isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}.")
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{name} must be an integer, got {value!r}.")
            if isinstance(value, str):
                value = value.replace("_", "")
                return int(float(value)) if "e" in value.lower() else int(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ConfigError(f"{name} must be a number, got {value!r}.")
            return float(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        if tp is Any:
            return value
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{name} must be of type {getattr(tp, '__name__', tp)}, got {value!r}.") from None
    raise ConfigError(f"{name} has an unsupported type {tp!r} (a bug in tinychat).")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table.")
    obj = base if base is not None else cls()  # type: ignore[call-arg]
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(names))}.")
        tp = hints[k]
        if _is_dataclass_type(tp):
            setattr(obj, k, from_dict(tp, value, f"{prefix}{k}.", getattr(obj, k)))
        else:
            setattr(obj, k, coerce(value, tp, f"{prefix}{k}"))
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain dict of a config (Paths as strings), suitable for TOML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, Path):
            out[f.name] = str(v)
        elif isinstance(v, list):
            out[f.name] = [str(x) if isinstance(x, Path) else x for x in v]
        else:
            out[f.name] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dumps_toml(obj: Any) -> str:
    """Serialise a config to TOML (None values are left out, so they keep their defaults on reload)."""
    d = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for k, v in d.items():
        if isinstance(v, dict) and dataclasses.is_dataclass(getattr(obj, k, None)):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")

    def emit(name: str, table: dict) -> None:
        lines.append(f"\n[{name}]")
        sub = []
        for k, v in table.items():
            if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                sub.append((f"{name}.{k}", v))
            elif isinstance(v, dict) and dataclasses.is_dataclass(_lookup(obj, f"{name}.{k}")):
                sub.append((f"{name}.{k}", v))
            elif v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        for n, t in sub:
            emit(n, t)

    for name, table in tables:
        emit(name, table)
    return "\n".join(lines).lstrip("\n") + "\n"


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist.")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}.") from None


def set_dotted(obj: Any, key: str, values: list[str], flag: str) -> None:
    """Apply one command-line override `--a.b.c v [v ...]` to a config object in place."""
    parts = key.replace("-", "_").split(".")
    target, cls = obj, type(obj)
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "this command"
            raise ConfigError(f"unknown option {flag}; options of {where}: {', '.join(sorted(names))}.")
        tp = _hints(cls)[part]
        if i < len(parts) - 1:
            if not _is_dataclass_type(tp):
                raise ConfigError(f"unknown option {flag}: {'.'.join(parts[: i + 1])} is not a section.")
            target, cls = getattr(target, part), tp
            continue
        if _is_dataclass_type(tp):
            raise ConfigError(f"option {flag} names a section; give one of its fields, e.g. {flag}.FIELD.")
        inner, _ = _unwrap_optional(tp)
        if get_origin(inner) is list:
            value: Any = values
        elif not values:
            if inner is bool:
                value = True
            else:
                raise ConfigError(f"option {flag} needs a value.")
        elif len(values) > 1:
            raise ConfigError(f"option {flag} takes one value, got {len(values)}: {' '.join(values)}.")
        else:
            value = values[0]
        setattr(target, part, coerce(value, tp, flag))


def _find_field(cls: type, name: str) -> str | None:
    """Resolve a bare `--field` to its unique dotted path when it is not a top-level field.

    A Python keyword names the field with a trailing underscore: `--from` fills `from_`."""
    name = name.replace("-", "_")
    if keyword.iskeyword(name):
        name += "_"
    hits = []
    for f in dataclasses.fields(cls):
        if f.name == name:
            return name
        tp = _hints(cls)[f.name]
        if _is_dataclass_type(tp):
            sub = _find_field(tp, name)
            if sub:
                hits.append(f"{f.name}.{sub}")
    return hits[0] if len(hits) == 1 else None


# Sections a preset file may share between commands: ignored by a command that has no such field.
SHARED_SECTIONS = {"model", "train"}


def apply_toml(cls: type[T], obj: T, data: dict[str, Any], section: str | None, sections: set[str]) -> T:
    """Apply a preset file to a command's config: its shared keys, then its own [section] table.

    One preset (configs/cpu-tiny.toml) serves every command: a top-level [model] or [train] table
    reaches each command that has one, and a table named after the command ([pretrain], [sft],
    [pretrain.train], ...) overrides them for that command only; other commands' tables are skipped.
    """
    data = dict(data)
    own = data.pop(section, {}) if section else {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in list(data):
        if key not in names and (key in sections or key in SHARED_SECTIONS):
            data.pop(key)
    obj = from_dict(cls, data, base=obj)
    return from_dict(cls, own, prefix=f"{section}.", base=obj) if own else obj


def parse_args(cls: type[T], argv: list[str], section: str | None = None, sections: set[str] | None = None) -> T:
    """Parse a command's argv into its config dataclass (defaults < --config TOML < flags)."""
    positional: list[str] = []
    flags: list[tuple[str, list[str]]] = []
    config_files: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            positional.extend(argv[i + 1 :])
            break
        if tok.startswith("--") and len(tok) > 2 and not _is_number(tok):
            key, eq, inline = tok[2:].partition("=")
            vals = [inline] if eq else []
            j = i + 1
            if not eq:
                arity = _arity(cls, key)
                while j < len(argv) and not (argv[j].startswith("--") and not _is_number(argv[j])):
                    if arity == "one" and vals:
                        break
                    if arity == "bool" and (vals or argv[j].lower() not in _BOOL_WORDS):
                        break
                    vals.append(argv[j])
                    j += 1
            if key == "config":
                if len(vals) != 1:
                    raise ConfigError("option --config takes exactly one TOML file.")
                config_files.append(vals[0])
            else:
                flags.append((key, vals))
            i = j
        else:
            positional.append(tok)
            i += 1

    merged: list[tuple[str, list[str]]] = []  # a repeated list flag extends the first (`--adapter a=x --adapter b=y`)
    first: dict[str, int] = {}
    for key, vals in flags:
        norm = key.replace("-", "_")
        if norm in first and _arity(cls, key) == "many":
            merged[first[norm]][1].extend(vals)
        else:
            first[norm] = len(merged)
            merged.append((key, list(vals)))
    flags = merged

    obj = cls()  # type: ignore[call-arg]
    for path in config_files:
        obj = apply_toml(cls, obj, load_toml(path), section, sections or set())
    pos_fields = [f for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    hints = _hints(cls)
    for key, vals in flags:
        resolved = key.replace("-", "_")
        if "." not in resolved and resolved not in {f.name for f in dataclasses.fields(cls)}:
            resolved = _find_field(cls, resolved) or resolved
        set_dotted(obj, resolved, vals, f"--{key}")
    if positional:
        if not pos_fields:
            raise ConfigError(f"unexpected argument {positional[0]!r}; options are given as --name value.")
        for f in pos_fields:
            if not positional:
                break
            inner, _ = _unwrap_optional(hints[f.name])
            if get_origin(inner) is list:
                setattr(obj, f.name, coerce(positional, hints[f.name], f.name))
                positional = []
            else:
                setattr(obj, f.name, coerce(positional.pop(0), hints[f.name], f.name))
        if positional:
            raise ConfigError(f"unexpected argument {positional[0]!r}.")
    return obj


_BOOL_WORDS = {"1", "0", "true", "false", "yes", "no", "on", "off"}


def _arity(cls: type, key: str) -> str:
    """How many words a flag takes: "many" (list), "bool" (zero or one true/false word) or "one"."""
    resolved = key.replace("-", "_")
    if resolved == "config":
        return "one"
    if "." not in resolved:
        resolved = _find_field(cls, resolved) or resolved
    tp: Any = cls
    for part in resolved.split("."):
        if not _is_dataclass_type(tp) or part not in _hints(tp):
            return "many"  # unknown: let set_dotted report it with every word it got
        tp = _hints(tp)[part]
    inner, _ = _unwrap_optional(tp)
    if get_origin(inner) is list:
        return "many"
    return "bool" if inner is bool else "one"


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def help_text(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """Every option of a command with its type, default and help, for `tinychat CMD --help`.

    A nested section shows the command's own defaults (`tinychat grpo --help` prints lr 5e-05, the value
    GRPOConfig's [train] default carries), not the section class's generic ones."""
    lines = []
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_dataclass_type(tp):
            lines.append(help_text(tp, f"{prefix}{f.name}.", getattr(defaults, f.name)))
            continue
        default = getattr(defaults, f.name)
        flag = f.name[:-1] if keyword.iskeyword(f.name[:-1]) else f.name  # from_ is spelled --from
        name = f.name.upper() if f.metadata.get("positional") else f"--{prefix}{flag}"
        inner, _ = _unwrap_optional(tp)
        if get_origin(inner) is Literal:
            tname = "|".join(map(str, get_args(inner)))
        else:
            tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  {name:<34} {tname:<14} default {default!r}  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)
