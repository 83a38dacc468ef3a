"""`tinychat world generate`: write the whole synthetic world to a directory, atomically.

Layout (docs/world.md explains each split):
    OUT/manifest.json              counts, bytes, estimated tokens and sha256 per file; seed, size, version
    OUT/world.json                 every entity, its facts and answers, and its group (the ground truth)
    OUT/pretrain/{train,val}.jsonl {"text"}
    OUT/sft/{train,val}.jsonl      {"messages", ["tools"], "skill", "lang"}
    OUT/preference/{train,val}.jsonl {"prompt", "chosen", "rejected", "skill", "lang"}
    OUT/rl/train.jsonl             {"messages", "answer", "aliases", "check", "skill", "lang"}
    OUT/kb/docs/**                 .md .html .txt .pdf files about "kb" entities
    OUT/eval/SKILL.jsonl           one file per skill (evalsets.SKILLS)
Why atomic: the world is written to a temporary sibling directory, audited for leaks, and renamed into
place, so a crash or a leak never leaves a half-written or wrong world where a pipeline would read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.world.entities import build_world, rng_for
from tinychat.world.evalsets import SKILLS, build_eval
from tinychat.world.facts import FACTS, LANGS, World
from tinychat.world.kb import build_docs
from tinychat.world.preference import build_preference
from tinychat.world.pretrain import build_pretrain
from tinychat.world.rl import build_rl
from tinychat.world.sft import build_sft
from tinychat.world.sizes import CPU_TINY_PRETRAIN_TOKENS, SIZES
from tinychat.world.splits import audit, reserve_templates

FORMAT = "tinyworld"
VERSION = 1


@dataclass
class WorldConfig:
    """Options of `tinychat world generate`."""

    out: str = field("", help="directory to write the world to (created; replaced if it holds a previous world)")
    seed: int = field(0, help="random seed; the same seed and size give byte-identical files")
    size: Literal["micro", "small", "medium"] = field("small", help="micro (tests), small (CPU speedrun), medium")
    force: bool = field(False, help="replace --out even if it is a non-empty directory that is not a world")


@dataclass(frozen=True)
class Manifest:
    """What a generated world contains; `path(rel)` resolves a file inside it."""

    root: Path
    seed: int
    size: str
    version: int
    generator: str  # generator_hash() of the code that wrote the world
    files: dict[str, dict[str, Any]]  # relative path -> {"rows", "bytes", "est_tokens", "sha256"}
    entities: dict[str, int]  # group -> count
    pretrain: dict[str, Any]

    def path(self, rel: str) -> Path:
        return self.root / rel


_CJK = re.compile("[\u3000-\u9fff\uff00-\uffef]")


def est_tokens(text: str) -> int:
    """Estimated BPE tokens: CJK characters / 1.5 plus all other UTF-8 bytes / 4 (an 8k-vocab rule of thumb)."""
    cjk = len(_CJK.findall(text))
    return round((len(text.encode("utf-8")) - 3 * cjk) / 4 + cjk / 1.5)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _world_json(world: World) -> dict[str, Any]:
    ents = []
    for e in world.entities.values():
        d = e.to_json()
        if e.facts:
            d["answers"] = {f: {lang: world.value(e, f, lang) for lang in LANGS} for f in FACTS[e.kind]}
        ents.append(d)
    counts: dict[str, int] = {}
    for e in world.entities.values():
        counts[e.group] = counts.get(e.group, 0) + 1
    return {
        "format": FORMAT,
        "version": VERSION,
        "seed": world.seed,
        "size": world.size,
        "countries": [{"en": en, "zh": zh} for en, zh in world.countries],
        "facts": FACTS,
        "group_counts": counts,
        "entities": ents,
    }


def build_files(seed: int, size: str) -> tuple[World, dict[str, bytes], dict[str, Any]]:
    """Everything in memory: (world, relative path -> bytes, pretraining stats). No file system access."""
    if size not in SIZES:
        raise UserError(f"--size must be one of {', '.join(SIZES)}, got {size!r}.")
    s = SIZES[size]
    world = build_world(seed, size)
    reserved = reserve_templates(world)
    kb_docs = build_docs(world, "kb", rng_for(seed, "kb"), n_reports=max(1, s.kb[2] // 3), n_notes=max(2, s.kb[0] // 3))
    rag_docs = build_docs(world, "ragtrain", rng_for(seed, "ragtrain"), both_langs=True)
    evals = build_eval(world, reserved, kb_docs)  # first: it reserves what training must not use
    pre_train, pre_val, mentions = build_pretrain(world, reserved.arith)
    sft_train, sft_val = build_sft(world, reserved, rag_docs)
    pref_train, pref_val = build_preference(world, reserved)
    rl = build_rl(world, reserved)

    files: dict[str, bytes] = {
        "pretrain/train.jsonl": _jsonl(pre_train),
        "pretrain/val.jsonl": _jsonl(pre_val),
        "sft/train.jsonl": _jsonl(sft_train),
        "sft/val.jsonl": _jsonl(sft_val),
        "preference/train.jsonl": _jsonl(pref_train),
        "preference/val.jsonl": _jsonl(pref_val),
        "rl/train.jsonl": _jsonl(rl),
    }
    for d in kb_docs:
        files[f"kb/docs/{d.path}"] = d.data
    for skill in SKILLS:
        files[f"eval/{skill}.jsonl"] = _jsonl(evals[skill])
    files["world.json"] = (json.dumps(_world_json(world), ensure_ascii=False, sort_keys=True, indent=1) + "\n").encode()

    known = [e for e in world.entities.values() if e.group in ("trained", "heldout")]
    per_lang = {lang: [mentions[(e.id, f, lang)] for e in known for f in FACTS[e.kind]] for lang in LANGS}
    tokens = sum(est_tokens(r["text"]) for r in pre_train)
    stats = {
        "train_est_tokens": tokens,
        "cpu_tiny_budget_tokens": CPU_TINY_PRETRAIN_TOKENS,
        "passes_at_cpu_tiny_budget": round(CPU_TINY_PRETRAIN_TOKENS / max(1, tokens), 1),
        "fact_mentions_min": {lang: min(v) for lang, v in per_lang.items()},
        "fact_mentions_mean": {lang: round(sum(v) / len(v), 2) for lang, v in per_lang.items()},
    }
    return world, files, stats


def _manifest_json(seed: int, size: str, world: World, files: dict[str, bytes], stats: dict) -> dict[str, Any]:
    info = {}
    for rel, data in sorted(files.items()):
        entry: dict[str, Any] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if rel.endswith(".jsonl"):
            entry["rows"] = data.count(b"\n")
        if not rel.endswith(".pdf"):
            entry["est_tokens"] = est_tokens(data.decode("utf-8"))
        info[rel] = entry
    groups: dict[str, int] = {}
    for e in world.entities.values():
        groups[e.group] = groups.get(e.group, 0) + 1
    return {
        "format": FORMAT,
        "version": VERSION,
        "generator": generator_hash(),
        "seed": seed,
        "size": size,
        "entities": groups,
        "pretrain": stats,
        "files": info,
        "token_estimate": "non-CJK UTF-8 bytes / 4 + CJK characters / 1.5",
    }


def generator_hash() -> str:
    """sha256 of this package's source: a world made by other code is stale even if VERSION was not bumped."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _is_world(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_manifest(world_dir: str | Path) -> Manifest:
    root = Path(world_dir)
    p = root / "manifest.json"
    if not p.is_file():
        raise UserError(
            f"{root} is not a tinyworld directory (no manifest.json); run 'tinychat world generate --out {root}'."
        )
    d = json.loads(p.read_text(encoding="utf-8"))
    if d.get("format") != FORMAT:
        raise UserError(f"{p} is not a tinyworld manifest (format is {d.get('format')!r}).")
    return Manifest(root, d["seed"], d["size"], d["version"], d["generator"], d["files"], d["entities"], d["pretrain"])


def generate_world(
    out_dir: str | Path, seed: int = 0, size: str = "small", force: bool = False, check: bool = True
) -> Manifest:
    """Write the world for (seed, size) to out_dir and return its manifest; see the module docstring.

    Refuses (UserError) to replace a non-empty directory that is not a previous world unless force=True.
    With check=True the written files are audited (splits.audit) before they are moved into place.
    """
    out = Path(out_dir)
    if str(out_dir) == "":
        raise UserError("world generate needs --out DIR, the directory to write the world to.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory.")
    if out.is_dir() and any(out.iterdir()) and not _is_world(out) and not force:
        raise UserError(
            f"--out {out} is a non-empty directory that is not a tinyworld; choose another directory "
            "or pass --force to replace it."
        )
    world, files, stats = build_files(seed, size)
    files["manifest.json"] = (
        json.dumps(_manifest_json(seed, size, world, files, stats), ensure_ascii=False, sort_keys=True, indent=1) + "\n"
    ).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the world is an ordinary directory
    try:
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        if check:
            problems = audit(tmp, world)
            assert not problems, "tinyworld split leak (a bug): " + "; ".join(problems[:5])
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "w")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return load_manifest(out)


def ensure_world(out_dir: str | Path, seed: int = 0, size: str = "small") -> Manifest:
    """The world at out_dir if this code generated it with this seed and size; otherwise (re)generate it."""
    out = Path(out_dir)
    if _is_world(out):
        m = load_manifest(out)
        if (m.seed, m.size, m.version, m.generator) == (seed, size, VERSION, generator_hash()):
            return m
    return generate_world(out, seed, size)


def run(cfg: WorldConfig) -> int:
    t0 = time.perf_counter()
    m = generate_world(cfg.out, cfg.seed, cfg.size, cfg.force)
    dt = time.perf_counter() - t0
    rows = {k: v.get("rows", 0) for k, v in m.files.items()}
    print(f"wrote tinyworld (size {m.size}, seed {m.seed}) to {m.root} in {dt:.1f}s")
    print(f"  entities: {', '.join(f'{g} {n}' for g, n in m.entities.items())}")
    print(
        f"  pretrain: {rows['pretrain/train.jsonl']} docs, ~{m.pretrain['train_est_tokens']:,} tokens "
        f"({m.pretrain['passes_at_cpu_tiny_budget']} passes at the cpu-tiny budget)"
    )
    print(
        f"  sft {rows['sft/train.jsonl']}, preference {rows['preference/train.jsonl']}, "
        f"rl {rows['rl/train.jsonl']} rows; "
        f"kb {sum(1 for k in m.files if k.startswith('kb/'))} documents; "
        f"eval {sum(v for k, v in rows.items() if k.startswith('eval/'))} rows in {len(SKILLS)} sets"
    )
    return 0
