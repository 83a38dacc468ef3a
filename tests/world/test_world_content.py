"""What the files contain: row schemas, fact coverage in pretraining, eval answers, knowledge-base files."""

from __future__ import annotations

import ast
import html.parser
import json
import operator
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest
from world_helpers import decoded_text, read_jsonl

from tinychat.world import SKILLS, check, chinese_words, load_manifest, load_world, render_en, render_zh
from tinychat.world.facts import FACTS, NUMERIC_FACTS
from tinychat.world.generate import build_files
from tinychat.world.names import SYLLABLES
from tinychat.world.sizes import SIZES

ROLES = {"system", "user", "assistant", "tool"}
CHECKS = {"exact", "short", "number", "exact_cased", "json", "sentence", "refusal"}


def _calc(expr: str) -> int:
    """A tiny arithmetic evaluator (ast, four operators) to verify calculator results without eval()."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(n: ast.AST) -> float:
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        assert isinstance(n, ast.Constant) and isinstance(n.value, int), ast.dump(n)
        return n.value

    v = ev(ast.parse(expr, mode="eval").body)
    assert float(v).is_integer()
    return int(v)


def _check_messages(msgs: list[dict], tools: list[dict] | None, final_assistant: bool) -> None:
    assert msgs and all(m["role"] in ROLES for m in msgs)
    assert all(isinstance(m["content"], str) for m in msgs)
    assert all(m["role"] != "system" for m in msgs[1:]), "system only first"
    names = {t["function"]["name"] for t in tools or []}
    pending: dict[str, str] = {}
    for m in msgs:
        if m["role"] == "assistant" and "tool_calls" in m:
            assert m["content"] == ""
            for call in m["tool_calls"]:
                assert call["type"] == "function" and call["function"]["name"] in names
                json.loads(call["function"]["arguments"])
                pending[call["id"]] = call["function"]["name"]
        elif m["role"] == "tool":
            assert pending.pop(m["tool_call_id"]) == m["name"]
        else:
            assert "tool_calls" not in m
    assert not pending, "every tool call has a result"
    assert msgs[-1]["role"] == ("assistant" if final_assistant else "user")
    if final_assistant:
        assert msgs[-1]["content"].strip() and "tool_calls" not in msgs[-1]


def test_row_schemas(micro_dir: Path) -> None:
    for row in read_jsonl(micro_dir / "pretrain/train.jsonl") + read_jsonl(micro_dir / "pretrain/val.jsonl"):
        assert set(row) == {"text"} and row["text"].strip()
    for rel in ("sft/train.jsonl", "sft/val.jsonl"):
        for row in read_jsonl(micro_dir / rel):
            assert set(row) <= {"messages", "tools", "skill", "lang"}
            _check_messages(row["messages"], row.get("tools"), final_assistant=True)
    for rel in ("preference/train.jsonl", "preference/val.jsonl"):
        for row in read_jsonl(micro_dir / rel):
            _check_messages(row["prompt"], row.get("tools"), final_assistant=False)
            if row["skill"] == "tool":  # the calculator's call, its result and the answer, against a direct answer
                _check_messages(row["prompt"] + row["chosen"], row["tools"], final_assistant=True)
                assert [m["role"] for m in row["chosen"]] == ["assistant", "tool", "assistant"]
                assert row["chosen"][-1]["content"] == row["chosen"][1]["content"] != row["rejected"][0]["content"]
            else:
                assert [m["role"] for m in row["chosen"]] == ["assistant"]
            assert [m["role"] for m in row["rejected"]] == ["assistant"]
            assert row["chosen"] != row["rejected"]
    for row in read_jsonl(micro_dir / "rl/train.jsonl"):
        _check_messages(row["messages"], None, final_assistant=False)
        assert row["check"] in CHECKS and check(row["answer"], row)
    for skill in SKILLS:
        rows = read_jsonl(micro_dir / "eval" / f"{skill}.jsonl")
        assert rows, skill
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert {
                "id",
                "skill",
                "lang",
                "messages",
                "question",
                "answer",
                "aliases",
                "check",
                "entity",
                "prompt_plain",
            } <= set(r)
            assert r["skill"] == skill and r["lang"] in ("en", "zh") and r["check"] in CHECKS
            assert r["messages"][-1] == {"role": "user", "content": r["question"]}
            _check_messages(r["messages"], r.get("tools"), final_assistant=False)


def test_calculator_results_are_right(small_dir: Path) -> None:
    n = 0
    for row in read_jsonl(small_dir / "sft/train.jsonl"):
        msgs = row["messages"]
        for call, result in zip(msgs, msgs[1:]):
            if call.get("tool_calls") and call["tool_calls"][0]["function"]["name"] == "calculator":
                expr = json.loads(call["tool_calls"][0]["function"]["arguments"])["expression"]
                assert result["content"] == str(_calc(expr)), expr
                n += 1
        if row["skill"] in ("arithmetic_tool", "agent"):
            assert msgs[-1]["content"] == msgs[-2]["content"]  # the answer is the tool's result
    assert n > 300
    for row in read_jsonl(small_dir / "eval/arithmetic_tool.jsonl"):
        assert row["answer"] == str(_calc(row["expression"]))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.。])\s*|\n", text) if s]


def test_every_known_fact_is_stated_in_pretraining_in_both_languages(micro_dir: Path, small_dir: Path) -> None:
    """Counted independently of the generator: sentences that contain both the entity name and the value."""
    for world_dir in (micro_dir, small_dir):
        w = load_world(world_dir)
        need = SIZES[w["size"]].docs_per_lang
        counts: Counter[tuple[str, str, str]] = Counter()
        by_name = {}
        for e in w["entities"]:
            if e["group"] in ("trained", "heldout"):
                for lang in ("en", "zh"):
                    by_name[(e["name"][lang], lang)] = e
        pattern = re.compile("|".join(re.escape(n) for n, _ in sorted(by_name, key=lambda k: -len(k[0]))))
        for row in read_jsonl(world_dir / "pretrain/train.jsonl"):
            lang = "zh" if re.search("[\u4e00-\u9fff]", row["text"]) else "en"
            for sent in _sentences(row["text"]):
                for name in set(pattern.findall(sent)):
                    e = by_name.get((name, lang))
                    if e is None:
                        continue
                    for f in FACTS[e["kind"]]:
                        v = e["answers"][f][lang]
                        if re.search(rf"(?<![\w]){re.escape(v)}(?![\w])" if lang == "en" else re.escape(v), sent):
                            counts[(e["id"], f, lang)] += 1
        for e in w["entities"]:
            if e["group"] in ("trained", "heldout"):
                for f in FACTS[e["kind"]]:
                    for lang in ("en", "zh"):
                        assert counts[(e["id"], f, lang)] >= need, (e["name"]["en"], f, lang)


def test_fact_replies_state_the_value_where_the_text_does(small_dir: Path) -> None:
    """SFT answers about facts: in English a short sentence whose value follows a space, as in every
    pretraining statement (so the value's BPE id is the one the facts are stored under); numbers and
    Chinese bare. The eval's grader takes them."""
    w = load_world(small_dir)
    ents = {e["name"]["en"]: e for e in w["entities"]}
    seen = Counter()
    for row in read_jsonl(small_dir / "sft/train.jsonl"):
        if row["skill"] != "facts":
            continue
        msgs = [m for m in row["messages"] if m["role"] != "system"]
        q, a = msgs[0]["content"], msgs[-1]["content"]
        name = next((n for n in ents if n in q), None) if row["lang"] == "en" else None
        if name is None:
            continue
        e = ents[name]
        for f in FACTS[e["kind"]]:
            v = e["answers"][f]["en"]
            if a == v or f"{v}." in a:
                seen[a == v] += 1
                assert check(a, {"answer": v, "aliases": [], "check": "short"})
                assert (a == v) == (f in NUMERIC_FACTS) and (a == v or f" {v}." in a), (q, a)
                break
    assert seen[False] > 100 and seen[True] > 20


def test_eval_answers_agree_with_the_world_and_the_grader(small_dir: Path) -> None:
    w = load_world(small_dir)
    ents = {e["id"]: e for e in w["entities"]}
    for skill in SKILLS:
        for r in read_jsonl(small_dir / "eval" / f"{skill}.jsonl"):
            if r["check"] == "exact_cased":
                assert check(r["answer"], r) and not check(r["answer"].lower(), r)
            elif r["check"] == "json":
                assert check(json.dumps({"answer": r["answer"]}, ensure_ascii=False), r) and not check(r["answer"], r)
            elif r["check"] == "sentence":
                assert check(r["reference"], r) and not check(r["answer"], r)
            elif r["check"] == "refusal":
                assert check(r["answer"], r) and not check("1987", r)
            else:
                assert check(r["answer"], r) and not check("I have no idea", r)
            if r.get("mode") == "cot" or skill == "agent":
                assert check(r["reference"], r), r["id"]
            if skill in ("facts_trained", "facts_heldout", "kb_qa"):
                e = ents[r["entity"]]
                assert r["answer"] == e["answers"][r["fact"]][r["lang"]]
                assert e["group"] == {"facts_trained": "trained", "facts_heldout": "heldout", "kb_qa": "kb"}[skill]
                cloze = r.get("cloze")
                if cloze:
                    assert cloze["answer"] == r["answer"] and e["name"][r["lang"]] in cloze["prompt"]


def test_trained_and_heldout_eval_are_comparable(small_dir: Path) -> None:
    a, b = (read_jsonl(small_dir / f"eval/facts_{g}.jsonl") for g in ("trained", "heldout"))
    assert len(a) == len(b)
    fa, fb = Counter(r["fact"] for r in a), Counter(r["fact"] for r in b)
    for f in set(fa) | set(fb):
        assert abs(fa[f] - fb[f]) <= max(15, 0.35 * max(fa[f], fb[f])), f


class _Html(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _pdf_text(data: bytes) -> str:
    chunks = re.findall(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S)
    out = []
    for c in chunks:
        try:
            out.append(zlib.decompress(c).decode("latin-1"))
        except zlib.error:
            continue
    return " ".join(re.findall(r"\((.*?)\) Tj", "\n".join(out)))


def test_kb_files_are_real_documents_and_hold_the_answers(small_dir: Path) -> None:
    docs = small_dir / "kb" / "docs"
    kinds = Counter(p.suffix for p in docs.rglob("*") if p.is_file())
    assert {".md", ".html", ".txt", ".pdf"} <= set(kinds)
    texts = {}
    for p in docs.rglob("*"):
        if p.suffix == ".pdf":
            data = p.read_bytes()
            assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
            texts[str(p.relative_to(docs))] = _pdf_text(data)
        elif p.suffix == ".html":
            h = _Html()
            h.feed(p.read_text(encoding="utf-8"))
            texts[str(p.relative_to(docs))] = " ".join(h.text)
        elif p.is_file():
            texts[str(p.relative_to(docs))] = p.read_text(encoding="utf-8")
    assert any(texts[k] for k in texts if k.endswith(".pdf"))
    for skill in ("kb_qa", "agent"):
        for r in read_jsonl(small_dir / "eval" / f"{skill}.jsonl"):
            assert r["sources"] and all(s in texts for s in r["sources"]), r["id"]
    for r in read_jsonl(small_dir / "eval/kb_qa.jsonl"):
        joined = " ".join(texts[s] for s in r["sources"]).replace("\n", " ")
        assert r["answer"] in joined, r["id"]


def test_name_characters_never_occur_in_templates() -> None:
    """The invariant that makes Chinese leak checks exact (see names.py)."""
    from tinychat.world import arith, evalsets, filler, kb, sft, vocab

    syllable_chars = {c for _, c in SYLLABLES}
    assert len(syllable_chars) == len(SYLLABLES)
    found: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, str):
            found.append(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    for mod in (render_zh, render_en, vocab, filler, arith, sft, kb, evalsets):
        for name, value in vars(mod).items():
            if name.isupper() or name.startswith("_"):
                walk(value)
    assert not syllable_chars & set("".join(found))


def test_names_are_unique_and_invented(small_dir: Path) -> None:
    w = load_world(small_dir)
    for lang in ("en", "zh"):
        names = [e["name"][lang] for e in w["entities"]] + [c[lang] for c in w["countries"]]
        assert len(names) == len(set(names)), lang
    for e in w["entities"]:
        assert re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)*", e["name"]["en"]), e["name"]


@pytest.mark.parametrize("size", ["micro", "small"])  # medium (~6 s) is measured in docs/world.md instead
def test_size_presets_build(size: str) -> None:
    _, _files, stats = build_files(0, size)
    assert stats["fact_mentions_min"]["en"] == SIZES[size].docs_per_lang


def test_templates_are_parallel() -> None:
    for table in ("STATEMENTS", "QUESTIONS", "NARRATIVE", "FOLLOWUPS", "CLOZE"):
        assert set(getattr(render_en, table)) == set(getattr(render_zh, table)), table
    for f in render_en.QUESTIONS:
        assert len(render_en.QUESTIONS[f]) == len(render_zh.QUESTIONS[f]), f
    for f, tmpls in list(render_en.STATEMENTS.items()) + list(render_zh.STATEMENTS.items()):
        assert all("{n}" in t and ("{v}" in t or "{a}" in t) for t in tmpls), f


def test_manifest_counts_match_world(micro_dir: Path) -> None:
    m = load_manifest(micro_dir)
    w = load_world(micro_dir)
    assert m.entities == w["group_counts"]
    text = decoded_text(micro_dir / "pretrain/train.jsonl")
    assert "tinyworld" not in text  # no generator artefacts in training text


def test_no_duplicates_and_val_disjoint_from_train(small_dir: Path) -> None:
    """A dedup stage downstream would silently drop repeats; validation must not copy training rows."""
    for split in ("pretrain", "sft", "preference"):
        train = [json.dumps(r, sort_keys=True) for r in read_jsonl(small_dir / split / "train.jsonl")]
        val = [json.dumps(r, sort_keys=True) for r in read_jsonl(small_dir / split / "val.jsonl")]
        assert len(set(train)) == len(train), split
        assert not set(val) & set(train), split
    rl = [json.dumps(r["messages"]) for r in read_jsonl(small_dir / "rl/train.jsonl")]
    assert len(set(rl)) == len(rl)


def test_copy_drills_repeat_a_list_of_known_names_and_numbers(micro_dir: Path) -> None:
    """Each drill states a list and repeats it word for word; names come only from the known entities."""
    from tinychat.world import copying

    world = load_world(micro_dir)
    known = {
        e["name"][lang] for e in world["entities"] if e["group"] in ("trained", "heldout") for lang in ("en", "zh")
    }
    others = {
        e["name"][lang] for e in world["entities"] if e["group"] not in ("trained", "heldout") for lang in ("en", "zh")
    }
    patterns = [
        re.compile("^" + re.escape(t).replace(r"\{a\}", "(?P<a>.+)", 1).replace(r"\{a\}", "(?P=a)") + "$", re.S)
        for lang in ("en", "zh")
        for t in copying.TEMPLATES[lang]
    ]
    drills = []
    for row in read_jsonl(micro_dir / "pretrain/train.jsonl"):
        m = next((p.match(row["text"]) for p in patterns if p.match(row["text"])), None)
        if m:
            drills.append(m.group("a"))
    assert len(drills) >= 0.95 * SIZES["micro"].copy_docs  # a few may coincide and are dropped as duplicates
    items = [it for a in drills for it in re.split(", |、", a)]
    names = [it for it in items if not re.fullmatch(r"[\d +\-*/]+", it)]
    assert names and set(names) <= known and not set(names) & others
    assert any(re.fullmatch(r"\d+ [+\-*/] \d+", it) for it in items)


def test_chinese_words_are_every_chinese_name_and_value_and_no_number(small_dir: Path):
    w = load_world(small_dir)
    words = chinese_words(w)
    assert words == sorted(set(words)) and all(re.search(r"[\u4e00-\u9fff]", x) for x in words)
    person = next(e for e in w["entities"] if e["kind"] == "person" and e.get("answers"))
    assert person["name"]["zh"] in words and "·" in person["name"]["zh"]  # a full name is one word
    assert person["answers"]["hobby"]["zh"] in words and person["answers"]["birth_year"]["zh"] not in words
    assert {c["zh"] for c in w["countries"]} <= set(words)
    text = (small_dir / "pretrain" / "train.jsonl").read_text(encoding="utf-8")
    assert sum(x in text for x in words) > 0.5 * len(words)  # most are written in the text (kb and fakes are not)


def test_english_format_answers_think_the_plain_answer_first(small_dir: Path) -> None:
    """English instruction rows (SFT and preference) state the fact as a plain answer would, in a <think>
    block, before the formatted answer; Chinese and numeric ones (whose plain answer is the bare value) and
    "full sentence" ones do not, except that a Chinese question asked for an English answer thinks the Chinese
    value first (round 34), and Chinese birth cities and employers, whose plain answer is a pronoun statement
    since round 35, think that statement. The grader ignores the block, so the row still grades as its answer."""
    w = load_world(small_dir)
    values = {a["en"] for e in w["entities"] for a in e.get("answers", {}).values()}
    zh_en = {a["zh"]: a["en"] for e in w["entities"] for a in e.get("answers", {}).values()}
    thought = Counter()
    for row in read_jsonl(small_dir / "sft/train.jsonl"):
        if row["skill"] != "instruction":
            continue
        a = row["messages"][-1]
        think = a.get("reasoning_content")
        thought[row["lang"], think is not None] += 1
        if think is None:
            continue
        if row["lang"] == "zh" and think in zh_en:  # asked for English: the Chinese value, then its English form
            assert zh_en[think] == a["content"], (think, a)
            continue
        if row["lang"] == "zh":  # birth city and employer: the plain answer's pronoun statement (round 35)
            assert think[0] in "他她" and think.endswith("。"), think
            v = next(v for v in zh_en if think.endswith(f"是{v}。"))
            assert v in a["content"] or zh_en[v] in a["content"], (think, a)
            continue
        assert think.endswith(".") and " " in think, think
        v = next(v for v in values if f" {v}." in think or f" the {v}." in think)
        assert v in a["content"] or v.upper() in a["content"] or re.search("[\u4e00-\u9fff]", a["content"]), (think, a)
        assert check(f"<think>\n{think}\n</think>\n\n{a['content']}", {"answer": a["content"], "check": "exact"})
    assert thought["en", True] > 100 and 10 < thought["zh", True] < thought["zh", False] and thought["zh", False] > 100
    assert thought["en", False] > 20  # numbers and full sentences answer at once
    pairs = [r for r in read_jsonl(small_dir / "preference/train.jsonl") if r["skill"] == "instruction"]
    with_think = [r for r in pairs if "reasoning_content" in r["chosen"][0]]
    assert with_think
    assert all(r["chosen"][0]["reasoning_content"] == r["rejected"][0]["reasoning_content"] for r in with_think)


def test_direct_multistep_answers_think_the_steps_first(small_dir: Path) -> None:
    """An SFT row asking a multistep problem for the answer alone thinks the step-by-step solution's steps in a
    <think> block and says only the answer (round 31); its step-by-step twin says the same steps, then
    "Answer: X". The grader reads the answer after the block."""
    rows = read_jsonl(small_dir / "sft/train.jsonl") + read_jsonl(small_dir / "sft/val.jsonl")  # twins may split
    cot = {r["messages"][-1]["content"].rsplit("\n", 1)[0] for r in rows if r["skill"] == "multistep_cot"}
    direct = [r for r in rows if r["skill"] == "multistep_direct"]
    assert len(direct) > 100
    for r in direct:
        a = r["messages"][-1]
        think, answer = a["reasoning_content"], a["content"]
        assert think in cot and "\n" not in answer and answer not in ("", think)
        assert check(f"<think>\n{think}\n</think>\n\n{answer}", {"answer": answer, "check": "exact"})
