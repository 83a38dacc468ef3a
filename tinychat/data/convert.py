"""`tinychat data convert`: instruction data in the formats people already have → tinychat chat rows.

    tinychat data convert --from alpaca   alpaca_data.json        --out sft.jsonl
    tinychat data convert --from sharegpt sg_90k.json --max-tokens 512 --tokenizer runs/x/tokenizer --out sg.jsonl
    tinychat data convert --from oasst    oasst1.messages.jsonl   --lang en zh --out oasst.parquet
    tinychat data convert --from dolly    databricks-dolly-15k.jsonl --out dolly.jsonl

Output rows are {"messages": [OpenAI messages], "id": "FORMAT:SOURCE-ID"} (JSONL, or Parquet for a .parquet
--out), what `tinychat sft` reads. Roles are mapped per format:

  alpaca    instruction (+ "\\n\\n" + input) → user, output → assistant; optional system, and history
            [[user, assistant], ...] before it (the LLaMA-Factory / Chinese-Alpaca variant)
  dolly     instruction (+ "\\n\\n" + context, the passage closed-QA and summarisation rows carry) → user,
            response → assistant
  sharegpt  conversations (or items) [{"from": human|user|gpt|chatgpt|assistant|system, "value"}]; cleaned as
            Vicuna did (FastChat's clean_sharegpt.py): HTML back to Markdown (html_md.py), a leading
            non-human turn and a trailing human turn dropped, turns must alternate, the conversation is cut
            before the first empty reply, and one with under 16 characters left is dropped
  oasst     OpenAssistant message trees, as the flat message export (one message per line with
            message_id / parent_id / role prompter|assistant / rank, oasst1's format, also its Parquet) or
            the tree export (one tree per line, {"message_tree_id", "prompt": {..., "replies": [...]}},
            oasst2's format): the best-ranked path of each tree (rank 0 is best; deleted messages and
            those that failed review are left out; a path ending in a prompter turn loses it)

Why split long conversations: a ShareGPT conversation can run to tens of thousands of tokens; SFT cuts
a row at its context, so everything after the cut is lost. Vicuna split such conversations at turn
boundaries into pieces that fit (FastChat's split_long_conversation.py); `--max-tokens N --tokenizer DIR`
does the same with the exact token count of the chat template (each message's rendered length, which
adds up because ChatML renders messages one after another), `--max-chars N` with characters. A system
message is repeated at the head of every piece; a single exchange longer than the limit stays whole
(SFT truncates it) and is counted.

Why bad rows never stop the batch: a public dump always has a few broken rows. Each one is skipped,
counted by reason and reported with its file and line ("alpaca.json line 812: field 'output' is empty");
--errors FILE writes them all as JSONL. The output is written to a temporary sibling and renamed into
place only when complete, so a failed run leaves no half file; an existing --out needs --force.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tinychat.config import field
from tinychat.data.html_md import html_to_markdown
from tinychat.errors import UserError

Messages = list[dict[str, str]]
Where = str  # "FILE line N" / "FILE row N"


class BadRow(Exception):
    """A row that cannot be converted; `kind` is the counted reason, the message adds the detail."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind


@dataclass
class Problem:
    where: Where
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


@dataclass
class ConvertConfig:
    input: Path | None = field(None, positional=True, help="the file to convert (.json array, .jsonl[.gz], .parquet)")
    from_: Literal["alpaca", "sharegpt", "oasst", "dolly"] | None = field(None, help="the input's format")
    out: Path | None = field(None, help="output chat rows: .jsonl, or .parquet (needs pyarrow)")
    max_tokens: int = field(0, help="split conversations into pieces of at most N chat-template tokens (0 = off)")
    tokenizer: Path | None = field(None, help="tokenizer directory that --max-tokens counts with")
    max_chars: int = field(0, help="split conversations into pieces of at most N characters of content (0 = off)")
    lang: list[str] = field([], help="oasst: keep only trees whose first message is in one of these languages")
    block_words: list[str] = field(
        [], help="sharegpt: drop conversations mentioning any of these words (Vicuna used openai chatgpt)"
    )
    errors: Path | None = field(None, help="also write every skipped row (where, kind, detail) to this JSONL file")
    show_errors: int = field(20, help="skipped rows printed one by one (all are counted)")
    force: bool = field(False, help="replace an existing --out")


# ---------------------------------------------------------------------------------------- reading records


def iter_records(path: Path) -> Iterator[tuple[Where, Any] | Problem]:
    """(where, JSON value) per record, or a Problem for a record that is not valid JSON.

    A .json file holding an array is read element by element with its line numbers (raw_decode from each
    element's offset); after a broken element the rest of the array cannot be found, so that is one
    Problem for the remainder. Any other .json file, .jsonl and .jsonl.gz are one value per line.
    """
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _parquet_records(path)
        return
    try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}).") from None
    if name.endswith(".json") and data.lstrip().startswith(b"["):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 (invalid byte at offset {e.start}).") from None
        yield from _array_records(path, text)
        return
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            yield f"{path} line {i}", json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield Problem(f"{path} line {i}", "bad UTF-8", f"invalid UTF-8 at byte {e.start} of the line")
        except json.JSONDecodeError as e:
            yield Problem(f"{path} line {i}", "bad JSON", f"not valid JSON ({e.msg})")


def _array_records(path: Path, text: str) -> Iterator[tuple[Where, Any] | Problem]:
    dec = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n:
            yield Problem(f"{path} line {line_at(n)}", "bad JSON", "the JSON array is not closed (truncated file?)")
            return
        if text[pos] == "]":
            return
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield Problem(
                f"{path} line {e.lineno}", "bad JSON", f"not valid JSON ({e.msg}); the rest of the array is lost"
            )
            return
        yield f"{path} line {line_at(pos)}", value
        pos = end
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] != "]":
            yield Problem(f"{path} line {line_at(pos)}", "bad JSON", "expected ',' or ']' between array elements")
            return


def _parquet_records(path: Path) -> Iterator[tuple[Where, Any] | Problem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}).") from None
    row = 0
    for g in range(pf.num_row_groups):
        for value in pf.read_row_group(g).to_pylist():
            row += 1
            yield f"{path} row {row}", value


# ---------------------------------------------------------------------------------------- per format


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow("missing field", f"field '{key}' is missing or empty")
        return ""
    if not isinstance(value, str):
        raise BadRow("wrong type", f"field '{key}' is {type(value).__name__}, expected a string")
    return value.strip()


def _object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRow("not an object", f"expected a JSON object, got {type(value).__name__}")
    return value


def from_alpaca(row: Any) -> Messages:
    row = _object(row)
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    msgs: Messages = []
    if system := _text(row, "system", required=False):
        msgs.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise BadRow("wrong type", f"field 'history' is {type(history).__name__}, expected a list of [user, assistant]")
    for k, pair in enumerate(history):
        if not (
            isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)
        ):
            raise BadRow("wrong type", f"history[{k}] must be a [user, assistant] pair of non-empty strings")
        msgs += [{"role": "user", "content": pair[0].strip()}, {"role": "assistant", "content": pair[1].strip()}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]


def from_dolly(row: Any) -> Messages:
    row = _object(row)
    instruction, context = _text(row, "instruction"), _text(row, "context", required=False)
    user = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "response")}]


SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system",
}  # fmt: skip


def from_sharegpt(row: Any, block_words: tuple[str, ...] = ()) -> Messages:
    """One ShareGPT conversation, cleaned as FastChat's clean_sharegpt.py cleans it (see the module doc)."""
    row = _object(row)
    turns = row.get("conversations", row.get("items"))
    if not isinstance(turns, list):
        raise BadRow("missing field", "field 'conversations' (or 'items') is missing or not a list")
    msgs: Messages = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRow("wrong type", f"conversations[{k}] is {type(t).__name__}, expected an object")
        who, value = t.get("from", t.get("role")), t.get("value", t.get("content"))
        role = SHAREGPT_ROLES.get(str(who).lower()) if isinstance(who, str) else None
        if role is None:
            raise BadRow("unknown role", f"conversations[{k}].from is {who!r}; expected human, gpt or system")
        if not isinstance(value, str):
            raise BadRow("wrong type", f"conversations[{k}].value is {type(value).__name__}, expected a string")
        msgs.append({"role": role, "content": value})
    system = [m for m in msgs[:1] if m["role"] == "system"]
    body = msgs[len(system) :]
    if body and body[0]["role"] != "user":  # a conversation shared from its middle (FastChat drops the turn)
        body = body[1:]
    if body and body[-1]["role"] == "user":  # the last question was never answered
        body = body[:-1]
    out: Messages = []
    for k, m in enumerate(body):
        if m["role"] != ("user", "assistant")[k % 2]:
            raise BadRow(
                "roles do not alternate",
                f"turn {k + 1} is {m['role']} where {('user', 'assistant')[k % 2]} was expected",
            )
        low = m["content"].lower()
        if any(w.lower() in low for w in block_words):
            raise BadRow("blocked word", f"turn {k + 1} mentions one of {', '.join(block_words)}")
        text = html_to_markdown(m["content"])
        if not text or not text[0].isprintable():  # an empty or broken reply ends the usable conversation
            break
        out.append({"role": m["role"], "content": text})
    out = out[: len(out) // 2 * 2]
    if sum(len(m["content"]) for m in out) < 16:
        raise BadRow("too short", "fewer than 16 characters of conversation after cleaning")
    if system:
        out.insert(0, {"role": "system", "content": html_to_markdown(system[0]["content"])})
    return out


# ---------------------------------------------------------------------------------------- OASST trees


@dataclass
class OasstNode:
    id: str
    parent: str | None
    role: str
    text: str
    rank: int | None
    created: str
    lang: str
    usable: bool  # not deleted and not rejected in review
    where: Where
    tree: str = ""


def _oasst_node(m: dict, where: Where, parent: str | None) -> OasstNode:
    text, role, mid = m.get("text"), m.get("role"), m.get("message_id")
    if not isinstance(mid, str) or not mid:
        raise BadRow("missing field", "field 'message_id' is missing")
    if role not in ("prompter", "assistant"):
        raise BadRow("unknown role", f"message {mid}: role is {role!r}; expected prompter or assistant")
    if not isinstance(text, str):
        raise BadRow("wrong type", f"message {mid}: field 'text' is {type(text).__name__}, expected a string")
    rank = m.get("rank")
    if rank is not None and not isinstance(rank, int | float):
        raise BadRow("wrong type", f"message {mid}: field 'rank' is {type(rank).__name__}, expected a number")
    usable = not m.get("deleted", False) and m.get("review_result", True) is not False and bool(text.strip())
    return OasstNode(
        mid, parent, role, text.strip(), None if rank is None else int(rank), str(m.get("created_date") or ""),
        str(m.get("lang") or ""), usable, where, str(m.get("message_tree_id") or ""),
    )  # fmt: skip


def _tree_nodes(row: dict, where: Where) -> list[OasstNode]:
    """The messages of one tree-export row ({"prompt": {..., "replies": [...]}}), parents before children."""
    out: list[OasstNode] = []
    stack: list[tuple[Any, str | None]] = [(row["prompt"], None)]
    while stack:
        m, parent = stack.pop()
        m = _object(m)
        node = _oasst_node(m, where, parent)
        out.append(node)
        replies = m.get("replies") or []
        if not isinstance(replies, list):
            raise BadRow("wrong type", f"message {node.id}: field 'replies' is not a list")
        stack += [(r, node.id) for r in reversed(replies)]
    return out


def best_path(root: OasstNode, children: dict[str, list[OasstNode]]) -> list[OasstNode]:
    """Root to leaf, taking at each step the best-ranked usable reply (rank 0 best; unranked last; then oldest)."""
    path = [root]
    while kids := [c for c in children.get(path[-1].id, []) if c.usable]:
        path.append(min(kids, key=lambda c: (c.rank is None, c.rank or 0, c.created, c.id)))
    return path


def oasst_conversations(
    records: Iterator[tuple[Where, Any]], lang: tuple[str, ...], problem: Callable[[Problem], None]
) -> Iterator[tuple[str, Messages]]:
    """(tree id, messages) of the best path of every tree, from flat message rows or tree rows (or both)."""
    nodes: dict[str, OasstNode] = {}
    for where, row in records:
        try:
            row = _object(row)
            new = _tree_nodes(row, where) if "prompt" in row else [_oasst_node(row, where, row.get("parent_id"))]
        except BadRow as e:
            problem(Problem(where, e.kind, str(e)))
            continue
        for n in new:
            if n.id in nodes:
                problem(Problem(where, "duplicate message", f"message {n.id} already appeared at {nodes[n.id].where}"))
            else:
                nodes[n.id] = n
    children: dict[str, list[OasstNode]] = {}
    for n in nodes.values():
        if n.parent is not None:
            if n.parent not in nodes:
                problem(
                    Problem(n.where, "orphan message", f"message {n.id}: its parent {n.parent} is not in the input")
                )
            children.setdefault(n.parent, []).append(n)
    for root in (n for n in nodes.values() if n.parent is None):
        if lang and root.lang not in lang:
            problem(Problem(root.where, "language", f"tree {root.tree or root.id} is in {root.lang or 'no language'}"))
            continue
        if not root.usable or root.role != "prompter":
            problem(
                Problem(
                    root.where,
                    "unusable root",
                    f"tree {root.tree or root.id}: the first message is deleted, rejected or not a prompt",
                )
            )
            continue
        path = best_path(root, children)
        for k, n in enumerate(path):
            if n.role != ("prompter", "assistant")[k % 2]:
                problem(
                    Problem(
                        n.where,
                        "roles do not alternate",
                        f"tree {root.tree or root.id}: message {n.id} is a {n.role} reply to a {path[k - 1].role}",
                    )
                )
                break
        else:
            path = path[: len(path) // 2 * 2]
            if not path:
                problem(Problem(root.where, "no reply", f"tree {root.tree or root.id} has no usable assistant reply"))
                continue
            roles = {"prompter": "user", "assistant": "assistant"}
            yield root.tree or root.id, [{"role": roles[n.role], "content": n.text} for n in path]


# ---------------------------------------------------------------------------------------- splitting


def split_conversation(msgs: Messages, cost: Callable[[dict[str, str]], int], limit: int) -> tuple[list[Messages], int]:
    """Pieces of at most `limit` (by `cost` summed over messages), cut between user/assistant exchanges.

    The leading system message is repeated in every piece. Returns (pieces, how many pieces are a single
    exchange over the limit, kept whole).
    """
    head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    body = msgs[len(head) :]
    assert len(body) % 2 == 0, "conversations reach the splitter as user/assistant pairs"
    base = sum(cost(m) for m in head)
    pieces: list[Messages] = []
    cur: Messages = []
    used, over = base, 0
    for i in range(0, len(body), 2):
        pair = body[i : i + 2]
        c = cost(pair[0]) + cost(pair[1])
        if cur and used + c > limit:
            pieces.append(head + cur)
            cur, used = [], base
        cur += pair
        used += c
        if len(cur) == 2 and used > limit:
            over += 1
    if cur:
        pieces.append(head + cur)
    return pieces, over


# ---------------------------------------------------------------------------------------- the command


def rows_writer(out: Path) -> tuple[Callable[[dict], None], Callable[[], None], Callable[[], None]]:
    """(write row, commit, abort) for a .jsonl or .parquet file written to a temporary sibling.

    commit renames the finished file into place; abort deletes it, so an error leaves no half file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    tmp = Path(tmp_name)
    if out.name.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        os.close(fd)
        rows: list[dict] = []

        def commit_parquet() -> None:
            pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
            os.replace(tmp, out)

        return rows.append, commit_parquet, lambda: tmp.unlink(missing_ok=True)
    fh = os.fdopen(fd, "w", encoding="utf-8")

    def commit_jsonl() -> None:
        fh.close()
        os.replace(tmp, out)

    def abort() -> None:
        fh.close()
        tmp.unlink(missing_ok=True)

    return lambda row: fh.write(json.dumps(row, ensure_ascii=False) + "\n"), commit_jsonl, abort


def check_out(out: Path, force: bool, source: Path) -> None:
    """--out must be a new .jsonl/.parquet file (or --force), and not the file being read."""
    if not out.name.lower().endswith((".jsonl", ".parquet")):
        raise UserError(f"--out {out} must end in .jsonl or .parquet.")
    if out.exists() and not force:
        raise UserError(f"output file {out} exists; pass --force to replace it.")
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the input file; write the rows somewhere else.")


def _cost_fn(cfg: ConvertConfig) -> tuple[Callable[[dict[str, str]], int], int] | None:
    if cfg.max_tokens and cfg.max_chars:
        raise UserError("pass --max-tokens or --max-chars, not both.")
    if cfg.max_tokens < 0 or cfg.max_chars < 0:
        raise UserError("--max-tokens and --max-chars must be >= 0.")
    if cfg.max_chars:
        return (lambda m: len(m["content"])), cfg.max_chars
    if not cfg.max_tokens:
        return None
    if cfg.tokenizer is None:
        raise UserError("--max-tokens needs --tokenizer DIR to count tokens with (or use --max-chars).")
    from tinychat.tokenizer import Tokenizer  # the seam: data is handed a tokenizer, loaded lazily here

    tok = Tokenizer.from_pretrained(cfg.tokenizer)
    return (lambda m: len(tok.render_chat([m]).ids)), cfg.max_tokens


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert cfg.input into cfg.out; returns the counts (rows read, written, split, skipped by kind)."""
    if cfg.input is None or cfg.from_ is None or cfg.out is None:
        raise UserError("usage: tinychat data convert --from alpaca|sharegpt|oasst|dolly FILE --out FILE.")
    if not cfg.input.is_file():
        raise UserError(f"input file {cfg.input} does not exist.")
    check_out(cfg.out, cfg.force, cfg.input)
    split = _cost_fn(cfg)
    stats: Counter[str] = Counter()
    problems: list[Problem] = []
    kinds: Counter[str] = Counter()

    def problem(p: Problem) -> None:
        kinds[p.kind] += 1
        problems.append(p)

    def records() -> Iterator[tuple[Where, Any]]:
        for r in iter_records(cfg.input):
            if isinstance(r, Problem):
                problem(r)
            else:
                stats["records"] += 1
                yield r

    def conversations() -> Iterator[tuple[str, Messages]]:
        if cfg.from_ == "oasst":
            yield from oasst_conversations(records(), tuple(cfg.lang), problem)
            return
        fn = {"alpaca": from_alpaca, "dolly": from_dolly}.get(cfg.from_)
        for where, row in records():
            try:
                msgs = fn(row) if fn else from_sharegpt(row, tuple(cfg.block_words))
            except BadRow as e:
                problem(Problem(where, e.kind, str(e)))
                continue
            rid = row.get("id") if isinstance(row.get("id"), str | int) else where.rsplit(" ", 1)[-1]
            yield str(rid), msgs

    write, commit, abort = rows_writer(cfg.out)
    try:
        for rid, msgs in conversations():
            stats["conversations"] += 1
            pieces, over = split_conversation(msgs, *split) if split else ([msgs], 0)
            stats["over_limit"] += over
            stats["split"] += len(pieces) > 1
            for k, piece in enumerate(pieces):
                suffix = f"#{k}" if len(pieces) > 1 else ""
                write({"messages": piece, "id": f"{cfg.from_}:{rid}{suffix}"})
                stats["rows"] += 1
        if not stats["rows"]:
            raise UserError(f"{cfg.input} gave no convertible rows ({_kinds_line(kinds) or 'it is empty'}).")
        problems.sort(key=lambda p: int(p.where.rsplit(" ", 1)[-1]))  # oasst finds some only after reading all
        if cfg.errors is not None:
            _write_problems(cfg.errors, problems)
        commit()
    except BaseException:
        abort()
        raise
    return {**stats, "skipped": sum(kinds.values()), "skipped_by_kind": dict(kinds.most_common()), "problems": problems}


def _write_problems(path: Path, problems: list[Problem]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"where": p.where, "kind": p.kind, "detail": p.detail}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _kinds_line(kinds: Counter[str]) -> str:
    return ", ".join(f"{k} {n:,}" for k, n in kinds.most_common())


def run(cfg: ConvertConfig) -> int:
    res = convert(cfg)
    print(
        f"{cfg.input} ({cfg.from_}): {res['records']:,} records → {res['conversations']:,} conversations → "
        f"{res['rows']:,} chat rows in {cfg.out}"
    )
    if res["split"]:
        print(
            f"split {res['split']:,} long conversations; "
            f"{res['over_limit']:,} single exchanges exceed the limit (kept whole)"
        )
    if res["skipped"]:
        print(f"skipped {res['skipped']:,}: {_kinds_line(Counter(res['skipped_by_kind']))}")
        for p in res["problems"][: cfg.show_errors]:
            print(f"  {p}")
        if res["skipped"] > cfg.show_errors:
            print(
                f"  ... {res['skipped'] - cfg.show_errors:,} more"
                + (f" in {cfg.errors}" if cfg.errors else " (--errors FILE lists all)")
            )
    return 0
