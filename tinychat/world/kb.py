"""Knowledge-base documents: files about entities the model has never seen, for retrieval and agents.

Why separate entities: a question about a "kb" entity can only be answered by reading its document, so
RAG and agent evaluations measure retrieval, not memory. The same renderer also writes the "ragtrain"
documents that SFT shows in context (never as files), so the model learns to read documents of this shape.
Formats are the ones users drop into a folder: Markdown, HTML, plain text, and PDF (English only: the
PDF core fonts have no CJK glyphs and no CJK font ships with the repository).
"""

from __future__ import annotations

import datetime
import html
import random
from dataclasses import dataclass, field

from tinychat.world import filler
from tinychat.world.facts import FACTS, Entity, Lang, World
from tinychat.world.render import Mentions, entity_doc, fact_sentence, render_en

LABELS = {
    "en": {
        "birth_year": "Born",
        "birth_city": "Birthplace",
        "occupation": "Occupation",
        "employer": "Employer",
        "hobby": "Hobby",
        "country": "Country",
        "population": "Population",
        "landmark": "Landmark",
        "founder": "Founder",
        "founded": "Founded",
        "headquarters": "Headquarters",
        "product": "Main product",
    },
    "zh": {
        "birth_year": "出生年份",
        "birth_city": "出生地",
        "occupation": "职业",
        "employer": "雇主",
        "hobby": "爱好",
        "country": "国家",
        "population": "人口",
        "landmark": "地标",
        "founder": "创始人",
        "founded": "成立年份",
        "headquarters": "总部",
        "product": "主要产品",
    },
}
HEAD = {"en": "Key facts", "zh": "基本信息"}
FOLDER = {"person": "people", "city": "cities", "company": "companies"}


@dataclass
class KbDoc:
    path: str  # relative to kb/docs/
    lang: Lang
    text: str  # plain text (what a loader should extract; what the search tool shows)
    data: bytes = b""  # the file's bytes
    states: list[tuple[str, str]] = field(default_factory=list)  # (entity id, fact) pairs the document states
    owner: str = ""  # the entity the document is about ("" for reports and notes)
    # The passages a knowledge base shows for the file: what tinychat.rag's loaders extract, cut where its
    # default splitter cuts (at a heading; no file here reaches its 800 characters). Markdown and HTML files
    # give a prose chunk and a key-facts chunk, plain text one chunk (tests/world/test_kb_chunks.py checks
    # them against the real loaders and splitter). Reading drills show these, not `text`.
    chunks: list[str] = field(default_factory=list)


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _facts_lines(world: World, e: Entity, lang: Lang) -> list[tuple[str, str]]:
    return [(LABELS[lang][f], world.value(e, f, lang)) for f in FACTS[e.kind]]


def entity_files(world: World, e: Entity, lang: Lang, fmt: str, rng: random.Random) -> KbDoc:
    """One document about `e`: a prose paragraph (with cross references) and a list of key facts."""
    mentions: Mentions = Mentions()
    para = entity_doc(world, e, lang, rng, mentions, title=False)
    facts = _facts_lines(world, e, lang)
    title = e.name[lang]
    sep = ": " if lang == "en" else "："
    lines = "\n".join(f"{k}{sep}{v}" for k, v in facts)  # the key facts as plain text shows them
    plain = f"{title}\n\n{para}\n\n{HEAD[lang]}\n{lines}\n"
    if fmt == "md":
        listed = "\n".join(f"- **{k}**{sep}{v}" for k, v in facts)
        data = f"# {title}\n\n{para}\n\n## {HEAD[lang]}\n\n{listed}\n"
        chunks = [f"# {title}\n\n{para}", f"## {HEAD[lang]}\n\n{listed}"]
    elif fmt == "html":
        items = "\n".join(f"<li><b>{html.escape(k)}</b>{sep}{html.escape(v)}</li>" for k, v in facts)
        data = (
            f'<!DOCTYPE html>\n<html lang="{"zh-CN" if lang == "zh" else "en"}">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>{html.escape(para)}</p>\n<h2>{HEAD[lang]}</h2>\n<ul>\n{items}\n</ul>\n</body>\n</html>\n"
        )
        chunks = [f"{title}\n\n{para}", f"{HEAD[lang]}\n\n{lines}"]
    else:
        data = plain.replace(f"{title}\n\n", f"{title}\n{'=' * (len(title) * (2 if lang == 'zh' else 1))}\n\n", 1)
        chunks = [data.strip()]
    suffix = "-zh" if lang == "zh" else ""
    path = f"{FOLDER[e.kind]}/{slug(e.name['en'])}{suffix}.{fmt}"
    states = sorted({(eid, f) for (eid, f, _lang) in mentions} | {(e.id, f) for f in FACTS[e.kind]})
    return KbDoc(path, lang, plain, data.encode("utf-8"), states, e.id, chunks)


def annual_report(world: World, c: Entity, rng: random.Random) -> KbDoc:
    """A company's annual report as a real PDF (English), listing staff: states employer facts too."""
    from fpdf import FPDF  # imported here: only world generation needs it

    mentions: Mentions = Mentions()
    intro = entity_doc(world, c, "en", rng, mentions, title=False, cross_refs=False)
    staff = world.index()["employees"][c.id]
    lines = [
        fact_sentence(
            world, world.entities[p], "employer", "en", rng.choice(render_en.STATEMENTS["employer"]), mentions
        )
        for p in staff
    ]
    body = [intro, "", "Our people", *lines, "", filler.paragraph("en", rng, 2, 4)]
    title = f"{c.name['en']} - Annual Report"
    pdf = FPDF()
    pdf.set_creation_date(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))  # no time stamps in content
    pdf.set_producer("tinychat tinyworld")
    pdf.set_title(title)
    pdf.add_page()
    pdf.set_font("Helvetica", style="B", size=16)
    pdf.multi_cell(0, 9, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=11)
    for para in body:
        pdf.multi_cell(0, 6, para or " ", new_x="LMARGIN", new_y="NEXT")
    plain = "\n".join([title, "", *body]) + "\n"
    states = sorted({(eid, f) for (eid, f, _lang) in mentions})
    return KbDoc(f"reports/{slug(c.name['en'])}-annual-report.pdf", "en", plain, bytes(pdf.output()), states)


def build_docs(
    world: World, group: str, rng: random.Random, n_reports: int = 0, n_notes: int = 0, both_langs: bool = False
) -> list[KbDoc]:
    """Documents for every entity of `group` (one or both languages), PDF reports, and fact-free notes."""
    docs: list[KbDoc] = []
    for e in world.group(group):
        first: Lang = "en" if rng.random() < 0.65 else "zh"
        second: list[Lang] = ["zh" if first == "en" else "en"]
        langs: list[Lang] = [first] + (second if both_langs or rng.random() < 0.25 else [])
        for lang in langs:
            docs.append(entity_files(world, e, lang, rng.choice(("md", "html", "txt")), rng))
    for c in world.group(group, "company")[:n_reports]:
        docs.append(annual_report(world, c, rng))
    for i in range(n_notes):
        lang: Lang = rng.choice(("en", "zh"))
        text = "\n\n".join(filler.paragraph(lang, rng) for _ in range(rng.randint(2, 4)))
        head = "Notes" if lang == "en" else "笔记"
        plain = f"{head} {i + 1}\n\n{text}\n"
        docs.append(
            KbDoc(f"notes/note-{i + 1:02d}{'-zh' if lang == 'zh' else ''}.txt", lang, plain, plain.encode("utf-8"))
        )
    paths = [d.path for d in docs]
    assert len(paths) == len(set(paths)), "duplicate knowledge-base path"
    return docs


def sources(docs: list[KbDoc]) -> dict[tuple[str, str], list[KbDoc]]:
    """(entity id, fact) -> the documents that state it."""
    out: dict[tuple[str, str], list[KbDoc]] = {}
    for d in docs:
        for key in d.states:
            out.setdefault(key, []).append(d)
    return out


def stated(w: World, d: KbDoc, chunk: str) -> list[tuple[Entity, str]]:
    """The (entity, fact) pairs of d.states that `chunk` itself states: the entity's name and the value are in
    it (a key-facts chunk names no one, so it states nothing a question could be sure of)."""
    out = []
    for eid, f in d.states:
        e = w.entities[eid]
        if e.name[d.lang] in chunk and w.value(e, f, d.lang) in chunk:
            out.append((e, f))
    return out


def search_result(hits: list[tuple[KbDoc, str]]) -> str:
    """(document, chunk) hits as tinychat.agent's search tool formats them: "[1] source: PATH\nCHUNK", blank lines
    between."""
    return "\n\n".join(f"[{i}] source: {d.path}\n{c.strip()}" for i, (d, c) in enumerate(hits, 1))


def passage(d: KbDoc) -> str:
    """How a retrieved document reads in a prompt or a search result: its source, then its text."""
    return f"source: {d.path}\n{d.text.strip()}"
