"""Answering from the knowledge base: guard the question, retrieve, prompt with numbered sources, cite.

Why the prompt has this exact shape: tinyworld's SFT data teaches the speedrun model to read documents
as a system message "Answer the question using only the documents below..." followed by numbered
passages "[1] source: PATH\\nTEXT" (tinychat.world.sft). Using the same shape here means the small model
sees at inference what it learned on; bigger instruction-tuned models read it just as well.

Why citations are checked, and sometimes attributed: a citation is only useful if it points at the chunk
that says the thing. Markers the model writes ([1], [2]) are kept when they name a retrieved source and
dropped when they do not (a hallucinated [7] of 4 sources). A model that answers without markers (the
tiny speedrun model answers with the bare value, as it was trained) gets its answer attributed to the
first source whose text contains the answer verbatim; an answer no source contains gets no citation
rather than a made-up one.

Why "I don't know" is decided before generation: when retrieval finds nothing above the similarity gate
the model is not asked at all, so it cannot guess. The input guard runs before retrieval too: prompt-
injection patterns and requests for personal data are refused with a fixed message (configurable).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tinychat.rag.retrieve import RetrieveConfig, Retriever
from tinychat.rag.types import Hit

RAG_SYSTEM = {  # the instruction tinyworld's SFT data uses (tinychat.world.sft.RAG_SYSTEM)
    "en": "Answer the question using only the documents below. If they do not contain the answer, say so.",
    "zh": "请只根据下面的文档回答问题。如果文档中没有答案，请直说。",
}
NO_CONTEXT = {
    "en": "I don't know: the knowledge base has nothing relevant to this question.",
    "zh": "我不知道：知识库中没有与这个问题相关的内容。",
}
REFUSED = {
    "injection": {
        "en": "I can't follow that request: it tries to override my instructions.",
        "zh": "我不能执行这个请求：它试图改变我的指令。",
    },
    "pii": {
        "en": "I can't help with requests for personal data such as ID numbers, passwords or contact details.",
        "zh": "我不能提供身份证号、密码或联系方式等个人信息。",
    },
}
_NOT_KNOWN = re.compile(r"do not (say|contain|mention)|don't (know|say)|not mentioned|没有(提到|答案)|不知道", re.I)

INJECTION_PATTERNS = (
    r"\b(ignore|disregard|forget)\b.{0,30}\b(previous|prior|above|earlier|all|your|system)\b.{0,20}"
    r"\b(instructions?|prompts?|rules|directions)",
    r"\b(reveal|show|print|repeat|leak)\b.{0,20}\b(system prompt|hidden prompt|your instructions)",
    r"\byou are now\b|\bact as (an? )?(unfiltered|unrestricted)|\bjailbreak|\bDAN mode\b|\bdeveloper mode\b",
    r"</?(system|im_start|im_end)\b|<\|im_(start|end)\|>",
    r"(忽略|无视|忘记).{0,10}(之前|以上|前面|所有|系统).{0,6}(指令|指示|说明|规则|提示)",
    r"(显示|告诉我|输出|泄露).{0,6}(系统提示|你的指令)",
)
PII_PATTERNS = (
    r"\b(social security|ssn|credit card|card number|bank account|iban|passport number|password|passcode)\b",
    r"\b(home address|phone number|mobile number|email address|date of birth of)\b.{0,40}\b(of|for)\b",
    r"身份证|银行卡|信用卡|密码|手机号|电话号码|家庭住址|护照号",
)


@dataclass
class GuardConfig:
    injection: bool = True
    pii: bool = True
    extra_patterns: list[str] = field(default_factory=list)  # more regexes to refuse (as "injection")


def guard(question: str, cfg: GuardConfig | None = None) -> str:
    """'' when the question may proceed, else the reason it is refused ('injection' or 'pii')."""
    cfg = cfg or GuardConfig()
    if cfg.injection and any(re.search(p, question, re.I | re.S) for p in (*INJECTION_PATTERNS, *cfg.extra_patterns)):
        return "injection"
    if cfg.pii and any(re.search(p, question, re.I) for p in PII_PATTERNS):
        return "pii"
    return ""


def language(text: str) -> str:
    """'zh' when CJK characters make up a fair share of the letters, else 'en' (decides the prompt language)."""
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    letters = sum(1 for ch in text if ch.isalpha())
    return "zh" if letters and cjk / letters > 0.3 else "en"


@dataclass
class Citation:
    n: int  # the marker number: [n]
    source: str
    name: str  # how the source is shown (relative to its ingest root)
    title: str
    heading: str
    chunk_id: str
    position: int
    start: int
    end: int
    score: float
    text: str


@dataclass
class Answer:
    question: str
    text: str
    status: str  # answered | no_context | refused
    reason: str = ""
    citations: list[Citation] = field(default_factory=list)
    sources: list[Citation] = field(default_factory=list)  # every retrieved chunk, numbered as in the prompt
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NameOf = Callable[[str], str]


def numbered_sources(hits: list[Hit], name_of: NameOf) -> list[Citation]:
    return [
        Citation(
            i,
            h.record.source,
            name_of(h.record.source),
            h.record.title,
            h.record.heading,
            h.record.id,
            h.record.position,
            h.record.start,
            h.record.end,
            round(float(h.score), 6),
            h.record.text,
        )
        for i, h in enumerate(hits, start=1)
    ]


def context_message(sources: list[Citation], lang: str) -> dict[str, str]:
    """The system message that carries the numbered sources (the shape the SFT data teaches)."""
    docs = "\n\n".join(f"[{c.n}] source: {c.name}\n{c.text.strip()}" for c in sources)
    return {"role": "system", "content": f"{RAG_SYSTEM[lang]}\n\n{docs}"}


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().strip(".。!！?？,，;；:：'\"").casefold()


def cite(text: str, sources: list[Citation]) -> tuple[str, list[Citation]]:
    """(answer text, the sources it cites): markers kept when valid, else attributed verbatim (see docstring)."""
    by_n = {c.n: c for c in sources}
    marked = [int(m) for m in re.findall(r"\[(\d+)\]", text)]
    valid = [n for n in dict.fromkeys(marked) if n in by_n]
    text = re.sub(r"\[(\d+)\]", lambda m: m.group(0) if int(m.group(1)) in by_n else "", text).strip()
    if valid:
        return text, [by_n[n] for n in valid]
    if not text or _NOT_KNOWN.search(text):
        return text, []
    needle = _norm(re.sub(r"\[\d+\]", "", text))
    if not needle:
        return text, []
    for c in sources:
        if needle in _norm(c.text):
            return f"{text} [{c.n}]", [c]
    return text, []


@dataclass
class AnswerConfig:
    retrieve: RetrieveConfig = field(default_factory=lambda: RetrieveConfig(min_similarity=0.3))
    guard: GuardConfig = field(default_factory=GuardConfig)
    max_tokens: int = 128


def answer(
    question: str,
    retriever: Retriever,
    chat: Callable[[list[dict[str, Any]]], str],
    name_of: NameOf,
    cfg: AnswerConfig | None = None,
) -> Answer:
    """Guard → retrieve → (nothing relevant: "I don't know") → generate with numbered sources → cite."""
    cfg = cfg or AnswerConfig()
    lang = language(question)
    reason = guard(question, cfg.guard)
    if reason:
        return Answer(question, REFUSED[reason][lang], "refused", reason)
    t0 = time.perf_counter()
    hits = retriever.search(question, cfg.retrieve)
    t1 = time.perf_counter()
    sources = numbered_sources(hits, name_of)
    if not sources:
        return Answer(question, NO_CONTEXT[lang], "no_context", sources=[], seconds={"retrieve": t1 - t0})
    reply = chat([context_message(sources, lang), {"role": "user", "content": question}])
    text, cited = cite(reply, sources)
    secs = {"retrieve": round(t1 - t0, 4), "generate": round(time.perf_counter() - t1, 4)}
    return Answer(question, text, "answered", citations=cited, sources=sources, seconds=secs)
