"""KbDoc.chunks, the passages reading drills show, equal what tinychat.rag's loaders and splitter make of the file."""

from __future__ import annotations

import random
from pathlib import Path

from tinychat.rag.kb import KbSettings
from tinychat.rag.loaders import load_file
from tinychat.rag.splitters import SplitConfig, split_document
from tinychat.world.entities import build_world
from tinychat.world.kb import build_docs


def test_chunks_are_the_knowledge_bases_chunks() -> None:
    settings = KbSettings()  # the knowledge base's defaults: what the speedrun's apply stage builds
    cfg = SplitConfig(settings.chunk_size, settings.overlap, settings.unit)
    w = build_world(7, "micro")
    formats = set()
    for group in ("trained", "kb", "ragtrain"):
        for d in build_docs(w, group, random.Random(7), both_langs=True):
            got = [c.text.strip() for c in split_document(load_file(Path(d.path), data=d.data), cfg)]
            assert got == d.chunks, d.path
            formats.add((d.path.rsplit(".", 1)[1], d.lang, len(d.chunks)))
    assert {f for f, _, _ in formats} == {"md", "html", "txt"}
    assert ("md", "zh", 2) in formats and ("txt", "en", 1) in formats  # a heading cuts md and html in two
