"""`tinychat data self-instruct`: grow new instructions and answers from a few seed tasks with a chat model.

    tinychat data self-instruct --seed-tasks seed_tasks.jsonl --base-url http://localhost:8000 --n 500 --out si.jsonl
    tinychat data self-instruct --seed-tasks seed_tasks.jsonl --model runs/s4/checkpoints/grpo --n 50 --out si.jsonl

The loop of Self-Instruct (Wang et al., 2022), which Alpaca used to grow 175 seed tasks into 52K:

1. Prompt: "Come up with a series of tasks:" and eight numbered instructions sampled from the pool, six
   from the human-written seeds and two from those generated so far (the paper's mix), ending with
   "Task 9:" for the model to continue.
2. Parse the reply into instructions at its "Task N:" / "N." markers. A reply cut off by max_tokens
   loses its last instruction (probably half-written), as in Alpaca's post-processing.
3. Filter each instruction, counting it under the first reason that drops it: too short (< 4 words) or
   too long (> 150); a keyword that a text model cannot act on (image, picture, graph, file, map, draw,
   plot, go to, video, audio, music, flowchart, diagram; Alpaca's list, plus 图片 图像 视频 音频 绘制);
   starting with "Write a program" (the paper's observation: the model tacks it onto everything);
   starting with punctuation; ROUGE-L >= 0.7 against any instruction already in the pool (seeds and kept
   ones; tinychat.data.rouge, which also sees Chinese). The paper's "starts with a non-English
   character" filter is deliberately not applied, so Chinese instructions survive.
4. Answer every kept instruction with the same model (one user turn, greedy by default, as the paper's
   instance generation); drop an answer that is empty, cut off by max_tokens, only repeats the
   instruction, or repeats an answer already kept.
5. Repeat until --n rows are kept or --max-rounds rounds have run.

Rows are chat rows {"messages": [user, assistant], "id", "meta"}; meta records the provenance: the
generator's name, the round, the seed tasks and generated tasks shown in the prompt, and the instruction's
nearest neighbour in the pool with its ROUGE-L. The output is written atomically when the run ends; the
counts of every filter stage are printed as a table (and written with --stats FILE).

The model is any OpenAI-compatible endpoint (--base-url: tinychat serve, vLLM, llama.cpp's server, OpenAI;
requests sent --concurrency at a time) or a local model directory (--model: tinychat's own batched
generation). Either is loaded lazily at this seam: data sits left of infer in the import order.
"""

from __future__ import annotations

import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tinychat.config import field
from tinychat.data.convert import check_out, rows_writer
from tinychat.data.readers import strict_jsonl_rows
from tinychat.data.rouge import max_rouge_l, rouge_tokens
from tinychat.data.shards import write_json_atomic
from tinychat.errors import UserError

Messages = list[dict[str, str]]
ERROR = "error"  # the finish reason of a request that failed

BLOCKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to", "video", "audio", "music", "flowchart", "diagram", "图片", "图像", "视频", "音频", "绘制",
]  # fmt: skip


@dataclass
class SelfInstructConfig:
    seed_tasks: Path | None = field(
        None, help="JSONL seed tasks: {instruction, [input, output | instances]} or chat rows {messages}"
    )
    base_url: str = field("", help="an OpenAI-compatible endpoint to generate with (tinychat serve, vLLM, ...)")
    served_model: str = field("", help="--base-url: the model name to request (default: the first it lists)")
    api_key: str = field("", help="--base-url: bearer token, if the endpoint wants one")
    model: str = field("", help="or a local model directory to generate with (tinychat's own inference)")
    device: str = field("cpu", help="--model: the device to run it on")
    n: int = field(100, help="rows to generate (instructions that survive every filter, with their answers)")
    out: Path | None = field(None, help="output chat rows, .jsonl or .parquet (written atomically at the end)")
    stats: Path | None = field(None, help="also write the filter counts to this JSON file")
    dropped: Path | None = field(None, help="also write every dropped instruction or answer, with its reason, as JSONL")
    prompts_per_round: int = field(8, help="instruction-generation requests per round")
    num_seed: int = field(6, help="seed instructions shown in each prompt")
    num_generated: int = field(2, help="generated instructions shown in each prompt (when there are any)")
    header: str = field("Come up with a series of tasks:", help="the first line of the generation prompt")
    temperature: float = field(0.7, help="sampling temperature for new instructions (the paper's 0.7)")
    top_p: float = field(0.5, help="nucleus mass for new instructions (the paper's 0.5)")
    max_tokens: int = field(256, help="max new tokens of an instruction-generation reply")
    answer_temperature: float = field(0.0, help="sampling temperature for answers (0 = greedy)")
    answer_max_tokens: int = field(256, help="max new tokens of an answer")
    rouge_threshold: float = field(0.7, help="drop an instruction whose ROUGE-L against the pool is at least this")
    min_words: int = field(4, help="drop instructions with fewer words (a CJK character counts as one)")
    max_words: int = field(150, help="drop instructions with more words")
    blocklist: list[str] = field(BLOCKLIST, help="drop instructions holding any of these words")
    max_rounds: int = field(50, help="stop after this many rounds even when fewer than --n rows survived")
    concurrency: int = field(4, help="--base-url: requests in flight at once")
    seed: int = field(0, help="random seed for sampling prompts and tokens")
    force: bool = field(False, help="replace an existing --out")


@dataclass
class Task:
    id: str
    instruction: str
    tokens: list[str]


class Sampler(Protocol):
    """Sampled chat replies for a batch of conversations: (text, finish reason) each.

    The finish reason is "stop", "length" (max_tokens cut it) or ERROR: the request failed (text holds why),
    e.g. a prompt grown past the server's context; one failed request is counted, not fatal."""

    name: str

    def sample(
        self, conversations: list[Messages], max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[tuple[str, str]]: ...


class LocalSampler:
    """A model directory on this machine; the whole batch in one call of tinychat's batched generator."""

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 16) -> None:
        from tinychat.infer.chat_backend import LocalChat  # the seam (module docstring)

        chat = LocalChat(model_dir, device)
        self.model, self.tokenizer, self.name = chat.completer.model, chat.tokenizer, chat.name
        self.batch_size = batch_size

    def sample(
        self, conversations: list[Messages], max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[tuple[str, str]]:
        import torch

        from tinychat.infer.generate import generate
        from tinychat.infer.sampling import SamplingParams

        ids = [self.tokenizer.render_chat(c, add_generation_prompt=True).ids for c in conversations]
        out: list[tuple[str, str]] = []
        for start in range(0, len(ids), self.batch_size):
            params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed + start)
            with torch.no_grad():
                gens = generate(
                    self.model, self.tokenizer, ids[start : start + self.batch_size], params, truncate="left"
                )
            out += [(g.text, g.finish_reason) for g in gens]
        return out


class RemoteSampler:
    """An OpenAI-compatible endpoint, `concurrency` requests in flight (a serving engine batches them)."""

    def __init__(self, base_url: str, served_model: str = "", api_key: str = "", concurrency: int = 4) -> None:
        from tinychat.infer.chat_backend import RemoteChat  # the seam (module docstring)

        self.chat = RemoteChat(base_url, served_model, api_key)
        self.name, self.concurrency = self.chat.name, max(1, concurrency)

    def sample(
        self, conversations: list[Messages], max_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[tuple[str, str]]:
        def one(k: int) -> tuple[str, str]:
            try:
                return self.chat.sample(conversations[k], max_tokens, temperature, top_p, seed + k)
            except UserError as e:  # an HTTP error for this one request (a wrong URL fails at startup)
                return str(e), ERROR

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, range(len(conversations))))


# ---------------------------------------------------------------------------------------- seeds, prompts, parsing


def read_seed_tasks(path: Path) -> list[Task]:
    """Seed tasks from JSONL: Alpaca/Self-Instruct's seed_tasks.jsonl, {instruction, ...} rows, or chat rows."""
    if not path.is_file():
        raise UserError(f"--seed-tasks {path} does not exist.")
    tasks, seen = [], set()
    for line, row in strict_jsonl_rows(path):
        text = None
        if isinstance(row, dict) and isinstance(row.get("instruction"), str):
            text = row["instruction"]
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            text = next(
                (m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"), None
            )
        if not isinstance(text, str) or not text.strip():
            raise UserError(
                f"{path} line {line}: expected an object with 'instruction' (or chat 'messages' with a user turn)."
            )
        tid = str(row.get("id") or f"seed_{line}")
        if tid in seen:
            raise UserError(f"{path} line {line}: seed id {tid!r} appears twice.")
        seen.add(tid)
        text = re.sub(r"\s+", " ", text).strip()
        tasks.append(Task(tid, text, rouge_tokens(text)))
    if not tasks:
        raise UserError(f"{path} holds no seed tasks.")
    return tasks


def build_prompt(header: str, shown: Sequence[Task]) -> str:
    """The paper's instruction-generation prompt: the header, numbered tasks, and the next number open."""
    lines = [header, ""] + [f"Task {k}: {t.instruction}" for k, t in enumerate(shown, 1)]
    return "\n".join(lines + [f"Task {len(shown) + 1}:"])


_MARKER = re.compile(r"(?im)^\s*(?:(?:task|任务)\s*\d+\s*[:：.]?|\d+\s*[.)、:：])[ \t]*")


def parse_instructions(reply: str) -> list[str]:
    """Instructions in a reply: the text before the first "Task N:" / "N." marker continues the open task."""
    parts = (re.sub(r"\s+", " ", p).strip() for p in _MARKER.split(reply))
    return [p for p in parts if p]


def instruction_problem(text: str, tokens: list[str], cfg: SelfInstructConfig) -> str | None:
    """The first filter that drops a parsed instruction (before the ROUGE-L check), or None."""
    if len(tokens) < cfg.min_words:
        return "too short"
    if len(tokens) > cfg.max_words:
        return "too long"
    low = text.lower()
    for w in cfg.blocklist:  # whole words in Latin script (Alpaca's rule); a substring in Chinese (no spaces)
        if re.search(rf"\b{re.escape(w.lower())}\b", low) if w.isascii() else w in text:
            return "blocked keyword"
    if low.startswith("write a program"):
        return "write a program"
    if unicodedata.category(text[0])[0] in "PS":
        return "starts with punctuation"
    return None


def _norm(s: str) -> str:
    return " ".join(rouge_tokens(s))


# ---------------------------------------------------------------------------------------- the loop

STAGES = [
    ("prompts", "generation prompts sent"),
    ("request failed", "generation requests that failed (e.g. the prompt outgrew the context)"),
    ("no tasks", "replies with no parseable instruction"),
    ("parsed", "instructions parsed"),
    ("cut off", "dropped: last of a reply cut off by max_tokens"),
    ("too short", "dropped: too short"),
    ("too long", "dropped: too long"),
    ("blocked keyword", "dropped: blocked keyword"),
    ("write a program", 'dropped: starts with "Write a program"'),
    ("starts with punctuation", "dropped: starts with punctuation"),
    ("near duplicate", "dropped: ROUGE-L >= threshold against the pool"),
    ("instructions kept", "instructions kept (added to the pool)"),
    ("answer request failed", "dropped: the answer request failed"),
    ("empty answer", "dropped: empty answer"),
    ("answer cut off", "dropped: answer cut off by answer_max_tokens"),
    ("answer echoes", "dropped: answer only repeats the instruction"),
    ("duplicate answer", "dropped: answer identical to a kept one"),
    ("over n", "answered beyond --n (not written)"),
    ("rows", "rows written"),
]


def self_instruct(
    cfg: SelfInstructConfig,
    sampler: Sampler,
    seeds: list[Task],
    log: Callable[[str], None] | None = None,
    dropped: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], Counter]:
    """Run rounds until cfg.n rows survive (or cfg.max_rounds); returns (rows, counts per stage).

    log, when given, receives one progress line per round; dropped, when given, collects every dropped
    instruction (and answer) with its round and reason, for a look at what the filters caught."""
    rng = random.Random(cfg.seed)
    pool: list[Task] = list(seeds)
    generated: list[Task] = []
    rows: list[dict[str, Any]] = []
    answers_kept: set[str] = set()
    counts: Counter[str] = Counter()
    for rnd in range(1, cfg.max_rounds + 1):
        if len(rows) >= cfg.n:
            break
        counts["rounds"] += 1
        shown_sets = []
        for _ in range(cfg.prompts_per_round):
            shown = rng.sample(seeds, min(cfg.num_seed, len(seeds)))
            shown += rng.sample(generated, min(cfg.num_generated, len(generated)))
            shown_sets.append(shown)
        convs = [[{"role": "user", "content": build_prompt(cfg.header, s)}] for s in shown_sets]
        replies = sampler.sample(convs, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.seed * 1_000_003 + rnd * 1000)
        counts["prompts"] += len(convs)
        _check_failures(replies, "instruction-generation")
        new: list[tuple[Task, list[Task], float, int]] = []  # (task, shown, rouge, nearest pool index)
        for shown, (reply, finish) in zip(shown_sets, replies):
            if finish == ERROR:
                counts["request failed"] += 1
                if dropped is not None:
                    dropped.append({"round": rnd, "reason": "request failed", "error": reply})
                continue
            cands = parse_instructions(reply)
            counts["parsed"] += len(cands)
            if not cands:
                counts["no tasks"] += 1
            if finish == "length" and cands:
                text = cands.pop()
                counts["cut off"] += 1
                if dropped is not None:
                    dropped.append({"round": rnd, "reason": "cut off", "instruction": text})
            for text in cands:
                tokens = rouge_tokens(text)
                why = instruction_problem(text, tokens, cfg)
                score, near = (0.0, -1) if why else max_rouge_l(tokens, [t.tokens for t in pool])
                if why is None and score >= cfg.rouge_threshold:
                    why = "near duplicate"
                if why:
                    counts[why] += 1
                    if dropped is not None:
                        near_text = pool[near].instruction if near >= 0 else ""
                        dropped.append(
                            {"round": rnd, "reason": why, "instruction": text, "rouge_l_max": round(score, 4)}
                            | ({"most_similar": near_text} if near_text else {})
                        )
                    continue
                task = Task(f"si-{rnd}-{len(new)}", text, tokens)
                pool.append(task)
                generated.append(task)
                new.append((task, shown, score, near))
                counts["instructions kept"] += 1
        if log is not None:
            log(f"round {rnd}: {len(new)} new instructions (pool {len(pool)}), {len(rows)}/{cfg.n} rows so far")
        if not new:
            continue
        convs = [[{"role": "user", "content": t.instruction}] for t, *_ in new]
        answers = sampler.sample(
            convs, cfg.answer_max_tokens, cfg.answer_temperature, 1.0, cfg.seed * 1_000_003 + rnd * 1000 + 500
        )
        _check_failures(answers, "answer")
        for (task, shown, score, near), (answer, finish) in zip(new, answers):
            answer = answer.strip()
            why = None
            if finish == ERROR:
                why = "answer request failed"
            elif not answer:
                why = "empty answer"
            elif finish == "length":
                why = "answer cut off"
            elif _norm(answer) == _norm(task.instruction):
                why = "answer echoes"
            elif answer in answers_kept:
                why = "duplicate answer"
            if why:
                counts[why] += 1
                if dropped is not None:
                    dropped.append({"round": rnd, "reason": why, "instruction": task.instruction, "answer": answer})
                continue
            if len(rows) >= cfg.n:
                counts["over n"] += 1
                continue
            answers_kept.add(answer)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": task.instruction},
                        {"role": "assistant", "content": answer},
                    ],
                    "id": f"self-instruct:{task.id}",
                    "meta": {
                        "method": "self-instruct",
                        "generator": sampler.name,
                        "round": rnd,
                        "seed_ids": [t.id for t in shown if not t.id.startswith("si-")],
                        "generated_ids": [t.id for t in shown if t.id.startswith("si-")],
                        "rouge_l_max": round(score, 4),
                        "most_similar": pool[near].instruction if near >= 0 else "",
                    },
                }
            )
            counts["rows"] += 1
    return rows, counts


def _check_failures(replies: list[tuple[str, str]], what: str) -> None:
    """Every request of a batch failing is not bad luck with one long prompt: stop and say why."""
    if replies and all(finish == ERROR for _, finish in replies):
        raise UserError(f"every {what} request of the round failed; the first: {replies[0][0]}")


def stats_table(counts: Counter) -> str:
    lines = ["| stage | count |", "| --- | ---: |"]
    return "\n".join(lines + [f"| {label} | {counts.get(key, 0):,} |" for key, label in STAGES])


def run(cfg: SelfInstructConfig) -> int:
    if cfg.seed_tasks is None or cfg.out is None:
        raise UserError(
            "usage: tinychat data self-instruct --seed-tasks FILE (--base-url URL | --model DIR) --n N --out FILE."
        )
    if bool(cfg.base_url) == bool(cfg.model):
        raise UserError("pass exactly one of --base-url URL or --model DIR to generate with.")
    for name in ("n", "prompts_per_round", "num_seed", "max_tokens", "answer_max_tokens", "max_rounds"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    if not 0 < cfg.rouge_threshold <= 1:
        raise UserError(f"--rouge-threshold must be in (0, 1], got {cfg.rouge_threshold}.")
    check_out(cfg.out, cfg.force, cfg.seed_tasks)
    if cfg.dropped is not None:
        check_out(cfg.dropped, cfg.force, cfg.seed_tasks)
    seeds = read_seed_tasks(cfg.seed_tasks)
    sampler: Sampler = (
        RemoteSampler(cfg.base_url, cfg.served_model, cfg.api_key, cfg.concurrency)
        if cfg.base_url
        else LocalSampler(cfg.model, cfg.device)
    )
    dropped: list[dict[str, Any]] = []
    rows, counts = self_instruct(cfg, sampler, seeds, lambda s: print(s, file=sys.stderr, flush=True), dropped)
    if cfg.dropped is not None:
        write_d, commit_d, _ = rows_writer(cfg.dropped)
        for d in dropped:
            write_d(d)
        commit_d()
    if not rows:
        raise UserError(
            f"no generated row survived the filters in {counts['rounds']} rounds; nothing written.\n"
            + stats_table(counts)
        )
    write, commit, abort = rows_writer(cfg.out)
    try:
        for r in rows:
            write(r)
        commit()
    except BaseException:
        abort()
        raise
    if cfg.stats is not None:
        write_json_atomic(cfg.stats, {"generator": sampler.name, "seeds": len(seeds), **counts})
    print(f"{len(rows):,} rows from {sampler.name} in {counts['rounds']} rounds ({len(seeds)} seed tasks) → {cfg.out}")
    if len(rows) < cfg.n:
        print(f"fewer than --n {cfg.n}: the filters kept too little in --max-rounds {cfg.max_rounds} rounds.")
    print(stats_table(counts))
    return 0
