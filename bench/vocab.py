"""Chinese-LLaMA on tinyworld: extend an English model's vocabulary for Chinese, continue pretraining, tune.

    .venv/bin/python bench/vocab.py [--out runs/vocab-demo] [--scale 0.25]     # the pipeline + measurements
    .venv/bin/python bench/vocab.py --out runs/vocab-demo --time                 # generation speed (quiet machine)
    .venv/bin/python bench/vocab.py --out runs/zh5 --base-zh 0.05 --stage1-only  # mean vs random, base saw Chinese

The pipeline, each step a real tinychat command (run in this process through tinychat.cli.main):
  1. `world generate` (small, seed 0); its pretraining text is split by script into an English and a
     Chinese half (a document with any CJK character is Chinese); Chinese SFT rows are the `zh` rows of
     the facts, tell_me, refusal and chitchat skills that offer no tools.
  2. `tokenizer train` on the English half only (4096 ids), `data tokenize`, `pretrain` the tiny preset
     on the English half: the "English-centred base model".
  3. `tokenizer extend --add 2048` with the Chinese half, and `model resize-vocab --init mean` and `--init random`.
  4. Continued pretraining on the Chinese half in Chinese-LLaMA's two stages: `pretrain --trainable embeddings`
     (stage 1: only the embeddings and the output layer learn), then `pretrain --lora.rank 16
     --lora.modules_to_save embed_tokens lm_head` (stage 2; the PEFT adapter is checked with `tinychat merge`).
     Stage 1 runs from both initialisations (their validation curves are the mean-vs-random comparison);
     stage 2 and SFT continue from the mean one.
  5. `sft` on the Chinese rows plus English ones (--sft-replay, 20% of the rows) with LoRA (+ embeddings
     and output layer as modules_to_save), then `merge`.
  6. Control: the same three stages with the same steps and batch shape (so the same compute) on the
     English model with its own tokenizer, which spends ~5x more tokens on the same Chinese text.
Measured: Chinese characters per token (val text), Chinese and English bits per byte on the world's val
text (comparable across tokenizers), Chinese fact-QA accuracy (the `zh` rows of eval/facts_trained, asked
through the chat template, graded by tinychat.world.answers.check), stage-1 curves of mean vs random init.
--time (run it on a quiet machine after the pipeline): Chinese generation speed in characters per second
of the final extended model against the control (greedy, 128 new tokens from Chinese prompts, no early
stop, batch 1, the same process, alternating arms).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tinychat.cli import main as cli
from tinychat.errors import UserError

CJK = re.compile("[\u4e00-\u9fff]")
SFT_SKILLS = ("facts", "tell_me", "refusal", "chitchat")
ZH_PROMPT = "下面简单介绍一下"
SEQ = 256  # training sequence length of every stage
# The default model: the tiny preset at half width and two thirds of the depth (~1.6M parameters with the
# extended vocabulary), so the whole pipeline fits a shared 2-core machine; --tiny trains the preset itself.
MINI = ["--model.d_model", 128, "--model.n_layer", 4, "--model.head_dim", 32, "--model.d_ff", 384,
        "--model.max_seq_len", SEQ]  # fmt: skip


def sh(*argv: Any) -> None:
    """One tinychat command, in this process; a non-zero status stops the bench."""
    args = [str(a) for a in argv]
    print(f"\n$ tinychat {' '.join(args)}", flush=True)
    if cli(args) != 0:
        raise SystemExit(f"command failed: tinychat {' '.join(args)}")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_world(world: Path, data: Path) -> None:
    """English / Chinese halves of the pretraining text, Chinese SFT rows, and a Chinese-only eval set."""
    for split in ("train", "val"):
        docs = read_jsonl(world / "pretrain" / f"{split}.jsonl")
        write_jsonl(data / f"{split}.en.jsonl", [d for d in docs if not CJK.search(d["text"])])
        write_jsonl(data / f"{split}.zh.jsonl", [d for d in docs if CJK.search(d["text"])])
        rows = read_jsonl(world / "sft" / f"{split}.jsonl")
        # rows offering the calculator carry ~200 tokens of English tool schema: left out, as are tools here
        keep = [r for r in rows if r["skill"] in SFT_SKILLS and not r.get("tools")]
        zh, en = [r for r in keep if r["lang"] == "zh"], [r for r in keep if r["lang"] == "en"]
        write_jsonl(data / f"sft.{split}.zh.jsonl", zh)
        write_jsonl(data / f"sft.{split}.en.jsonl", en)
    facts = [r for r in read_jsonl(world / "eval" / "facts_trained.jsonl") if r["lang"] == "zh"]
    write_jsonl(data / "world_zh" / "eval" / "facts_trained.jsonl", facts)


def texts(path: Path) -> list[str]:
    return [r["text"] for r in read_jsonl(path)]


def stage_flags(steps: int, lr: float, eval_every: int) -> list[str]:
    """The loop's options shared by every continued-pretraining and SFT stage of both arms (same compute)."""
    return [
        "--train.max_steps", steps, "--train.batch_size", 8, "--train.seq_len", SEQ, "--train.lr", lr,
        "--train.warmup_steps", 10, "--train.weight_decay", 0.0, "--train.eval_every", eval_every,
        "--train.eval_batches", 4, "--train.checkpoint_every", 0, "--train.tensorboard", "false",
        "--train.precision", "bf16",
    ]  # fmt: skip


def mix(main: list[dict], extra: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """`main` plus documents of `extra` (drawn at random) making up about `fraction` of the result's bytes."""
    size = lambda docs: sum(len(d["text"].encode()) for d in docs)  # noqa: E731
    want = fraction / (1 - fraction) * size(main) if fraction > 0 else 0
    pool = list(extra)
    random.Random(seed).shuffle(pool)
    picked, have = [], 0
    for d in pool:
        if have >= want:
            break
        picked.append(d)
        have += len(d["text"].encode())
    docs = main + picked
    random.Random(seed + 1).shuffle(docs)
    return docs


def sft_mix(data: Path, replay: float, seed: int = 0) -> Path:
    """The Chinese SFT rows plus English ones making up `replay` of the rows: English replay in SFT too, since
    SFT trains the embeddings and output layer whole (modules_to_save), which is what forgets English."""
    zh, en = read_jsonl(data / "sft.train.zh.jsonl"), read_jsonl(data / "sft.train.en.jsonl")
    random.Random(seed).shuffle(en)
    rows = zh + en[: int(replay / (1 - replay) * len(zh))] if replay > 0 else zh
    random.Random(seed + 1).shuffle(rows)
    write_jsonl(data / "sft.train.mix.jsonl", rows)
    return data / "sft.train.mix.jsonl"


def pipeline(
    out: Path,
    scale: float,
    add: int,
    tiny: bool,
    replay: float,
    base_zh: float,
    stage1_only: bool,
    sft_replay: float,
    sft_adapter_only: bool,
    sft_lr: float,
) -> None:
    world, data, models = out / "world", out / "data", out / "models"
    s = lambda n: max(10, int(n * scale))  # noqa: E731 - steps at this --scale
    sh("world", "generate", "--out", world, "--size", "small", "--seed", 0)
    split_world(world, data)
    tok_en, tok_ext = out / "tok_en", out / "tok_ext"
    sh("tokenizer", "train", "--input", data / "train.en.jsonl", "--vocab-size", 4096, "--out", tok_en)
    sh("tokenizer", "extend", "--tokenizer", tok_en, "--input", data / "train.zh.jsonl", "--add", add, "--out", tok_ext)
    en_docs, zh_docs = read_jsonl(data / "train.en.jsonl"), read_jsonl(data / "train.zh.jsonl")
    write_jsonl(data / "train.base.jsonl", mix(en_docs, zh_docs, base_zh))  # the base model's text
    write_jsonl(data / "train.cpt.jsonl", mix(zh_docs, en_docs, replay))  # continued pretraining's text
    for name, src, tok in (
        ("en", "train.base", tok_en),
        ("zh_old", "train.cpt", tok_en),
        ("zh_new", "train.cpt", tok_ext),
    ):
        sh("data", "tokenize", data / f"{src}.jsonl", "--tokenizer", tok, "--out", data / name,
           "--val-fraction", 0.02, "--workers", 1, "--force", "--progress", "false")  # fmt: skip

    # the English-centred base model
    size = [] if tiny else MINI
    sh("pretrain", "--runs-dir", out, "--run", "en", "--tokenizer", tok_en, "--data", data / "en", *size,
       "--train.max_steps", s(300), "--train.batch_size", 8, "--train.seq_len", SEQ, "--train.warmup_steps", 30,
       "--train.eval_every", 0, "--train.checkpoint_every", 0, "--train.tensorboard", "false",
       "--train.precision", "bf16", "--samples", "The", "Velmora")  # fmt: skip
    en_model = out / "en" / "checkpoints" / "pretrain"
    for init in ("mean", "random"):
        sh("model", "resize-vocab", "--model", en_model, "--tokenizer", tok_ext, "--init", init,
           "--out", models / f"resized_{init}")  # fmt: skip

    stage1, stage2, sft = stage_flags(s(150), 3e-3, 25), stage_flags(s(300), 2e-3, 100), stage_flags(s(150), sft_lr, 0)
    lora = ["--lora.rank", 16, "--lora.alpha", 32, "--lora.modules_to_save", "embed_tokens", "lm_head"]
    arms = {"ext": (tok_ext, data / "zh_new", ["mean", "random"]), "ctl": (tok_en, data / "zh_old", [None])}
    for arm, (tok, tokens, inits) in arms.items():
        for init in inits:
            start = models / f"resized_{init}" if init else en_model
            sh("pretrain", "--runs-dir", out, "--run", arm, "--stage", f"cpt1_{init or 'old'}", "--init", start,
               "--tokenizer", tok, "--data", tokens, "--trainable", "embeddings", "--samples", ZH_PROMPT,
               *stage1)  # fmt: skip
        if stage1_only:
            return
        base1 = out / arm / "checkpoints" / f"cpt1_{inits[0] or 'old'}"
        sh("pretrain", "--runs-dir", out, "--run", arm, "--stage", "cpt2", "--init", base1, "--tokenizer", tok,
           "--data", tokens, "--samples", ZH_PROMPT, *lora, *stage2)  # fmt: skip
        cpt2 = out / arm / "checkpoints" / "cpt2"
        sh("merge", "--adapter", cpt2 / "adapter", "--out", models / f"{arm}_cpt2_merged")
        sh("sft", "--runs-dir", out, "--run", arm, "--stage", "sft_zh", "--init", cpt2,
           "--data", sft_mix(data, sft_replay), "--val-data", data / "sft.val.zh.jsonl", "--eval-rows", 0,
           *(lora[:4] if sft_adapter_only else lora), *sft)  # fmt: skip
        sh("merge", "--adapter", out / arm / "checkpoints" / "sft_zh" / "adapter", "--out", models / f"{arm}_final")


def load(path: Path) -> tuple[Any, Any]:
    from tinychat.infer.complete import load as load_model

    return load_model(path)


def bpb(path: Path, text: Path) -> float:
    from tinychat.eval.bpb import bits_per_byte

    model, tok = load(path)
    return bits_per_byte(model, tok, text, seq_len=SEQ, max_tokens=0)["bpb"]


def loop_bpb(path: Path, tokens: Path) -> float:
    """val_bpb exactly as a continued-pretraining stage's evaluation computes it (its batches, bf16 autocast)."""
    from tinychat.tokenizer.bytes import token_byte_lengths
    from tinychat.train.config import TrainConfig
    from tinychat.train.distributed import DistInfo
    from tinychat.train.loop import TrainContext
    from tinychat.train.pretrain import evaluate_lm

    model, tok = load(path)
    cpu = torch.device("cpu")
    cfg = TrainConfig(batch_size=8, seq_len=SEQ, eval_batches=4)
    ctx = TrainContext(cfg, DistInfo(0, 1, 0, cpu), cpu, torch.bfloat16, path, "step0")
    token_bytes = torch.tensor(token_byte_lengths(tok), dtype=torch.float32)
    return evaluate_lm(model, tokens, cfg, token_bytes, ctx)["val_bpb"]


def facts_zh(path: Path, world_zh: Path, mode: str) -> float:
    from tinychat.eval.backend import LocalCompleter
    from tinychat.eval.suites import SuiteOptions, run_suite

    model, tok = load(path)
    return run_suite(LocalCompleter(model, tok), world_zh, "facts_trained", mode, SuiteOptions(samples=0))["accuracy"]


def curve(out: Path, arm: str, stage: str) -> list[tuple[int, float]]:
    from tinychat.train.metrics import read_metrics

    return [(r["step"], r["val_bpb"]) for r in read_metrics(out / arm, stage, "eval") if "val_bpb" in r]


def measure(out: Path) -> dict[str, Any]:
    """Every number of docs/vocab.md's table, from the files the pipeline wrote; saved to OUT/vocab.json."""
    from tinychat.tokenizer import Tokenizer
    from tinychat.tokenizer.extend import chars_per_token

    data, models = out / "data", out / "models"
    zh_val, en_val = data / "val.zh.jsonl", data / "val.en.jsonl"
    zh_text = "\n".join(texts(zh_val))
    old, new = Tokenizer.from_pretrained(out / "tok_en"), Tokenizer.from_pretrained(out / "tok_ext")
    en_model = out / "en" / "checkpoints" / "pretrain"
    ck = {arm: out / arm / "checkpoints" for arm in ("ext", "ctl")}
    # the cpt2 checkpoint holds merged weights; `tinychat merge` of its adapter must give the same model
    parity = {}
    for arm in ("ext", "ctl"):
        a, _ = load(ck[arm] / "cpt2")
        b, _ = load(models / f"{arm}_cpt2_merged")
        x = torch.randint(16, a.cfg.vocab_size, (2, 32))
        with torch.no_grad():
            parity[arm] = float((a(x) - b(x)).abs().max())
    r: dict[str, Any] = {
        "vocab": {"old": old.vocab_size, "new": new.vocab_size},
        "zh_chars_per_token": {"old": chars_per_token(old, zh_text), "new": chars_per_token(new, zh_text)},
        "en_identical": all(old.encode(t) == new.encode(t) for t in texts(en_val)),
        "merge_parity_max_abs_diff": parity,
        "zh_bpb": {
            "english model": bpb(en_model, zh_val),
            "resized, mean init (step 0)": bpb(models / "resized_mean", zh_val),
            "resized, random init (step 0)": bpb(models / "resized_random", zh_val),
            "ext stage 1, mean": bpb(ck["ext"] / "cpt1_mean", zh_val),
            "ext stage 1, random": bpb(ck["ext"] / "cpt1_random", zh_val),
            "ext stage 2": bpb(ck["ext"] / "cpt2", zh_val),
            "ext SFT (merged)": bpb(models / "ext_final", zh_val),
            "control stage 1": bpb(ck["ctl"] / "cpt1_old", zh_val),
            "control stage 2": bpb(ck["ctl"] / "cpt2", zh_val),
            "control SFT (merged)": bpb(models / "ctl_final", zh_val),
        },
        "en_bpb": {
            "english model": bpb(en_model, en_val),
            "ext stage 2": bpb(ck["ext"] / "cpt2", en_val),
            "ext SFT (merged)": bpb(models / "ext_final", en_val),
            "control stage 2": bpb(ck["ctl"] / "cpt2", en_val),
            "control SFT (merged)": bpb(models / "ctl_final", en_val),
        },
        "facts_zh": {
            "ext stage 2 (3-shot)": facts_zh(ck["ext"] / "cpt2", data / "world_zh", "base"),
            "control stage 2 (3-shot)": facts_zh(ck["ctl"] / "cpt2", data / "world_zh", "base"),
            "ext SFT (chat)": facts_zh(models / "ext_final", data / "world_zh", "chat"),
            "control SFT (chat)": facts_zh(models / "ctl_final", data / "world_zh", "chat"),
        },
        "curves": {
            "mean": curve(out, "ext", "cpt1_mean"),
            "random": curve(out, "ext", "cpt1_random"),
            "control": curve(out, "ctl", "cpt1_old"),
        },
    }
    # step 0 of the curves: the starting models through the loop's own evaluation (same val batches, bf16)
    for init in ("mean", "random"):
        r["curves"][init].insert(0, (0, loop_bpb(models / f"resized_{init}", data / "zh_new")))
    r["curves"]["control"].insert(0, (0, loop_bpb(en_model, data / "zh_old")))
    en = r["en_bpb"]
    r["en_forgetting"] = {k: v / en["english model"] - 1 for k, v in en.items() if k != "english model"}
    (out / "vocab.json").write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
    return r


def stage1_table(out: Path) -> str:
    """The mean-vs-random curves of stage 1 alone (`--stage1-only`)."""
    models, data = out / "models", out / "data"
    curves = {init: [(0, loop_bpb(models / f"resized_{init}", data / "zh_new")), *curve(out, "ext", f"cpt1_{init}")]
              for init in ("mean", "random")}  # fmt: skip
    lines = ["| stage-1 step | mean init bpb | random init bpb |", "|---:|---:|---:|"]
    lines += [f"| {s} | {m:.3f} | {r:.3f} |" for (s, m), (_, r) in zip(curves["mean"], curves["random"])]
    return "\n".join(lines)


def table(r: dict[str, Any]) -> str:
    cpt = r["zh_chars_per_token"]
    lines = [
        f"vocabulary {r['vocab']['old']} -> {r['vocab']['new']} tokens; English val text tokenizes identically: "
        f"{r['en_identical']}; stage-2 adapter merged by `tinychat merge` vs the run's merged weights: max |diff| "
        + ", ".join(f"{k} {v:.1e}" for k, v in r["merge_parity_max_abs_diff"].items()),
        "",
        "| measure | before (English tokenizer) | after (extended) | ratio |",
        "|---|---:|---:|---:|",
        f"| Chinese characters per token (val) | {cpt['old']:.3f} | {cpt['new']:.3f} "
        f"| {cpt['new'] / cpt['old']:.2f}x |",
        "",
        "| model | Chinese bpb | English bpb |",
        "|---|---:|---:|",
    ]
    for k, v in r["zh_bpb"].items():
        en = r["en_bpb"].get(k)
        lines.append(f"| {k} | {v:.3f} | {'' if en is None else f'{en:.3f}'} |")
    lines += ["", "| English forgetting (bpb change vs the English model) | |", "|---|---:|"]
    lines += [f"| {k} | {v:+.1%} |" for k, v in r["en_forgetting"].items()]
    lines += ["", "| Chinese fact QA (facts_trained, zh rows) | accuracy |", "|---|---:|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in r["facts_zh"].items()]
    lines += ["", "| stage-1 step | mean init bpb | random init bpb | control bpb |", "|---:|---:|---:|---:|"]
    ctl = dict(r["curves"]["control"])
    for (step, m), (_, rnd) in zip(r["curves"]["mean"], r["curves"]["random"]):
        lines.append(f"| {step} | {m:.3f} | {rnd:.3f} | {f'{ctl[step]:.3f}' if step in ctl else ''} |")
    return "\n".join(lines)


def timing(out: Path, prompts: int, max_new: int, rounds: int) -> None:
    """Chinese generation speed, extended vs control: the same prompts, greedy, fixed length, batch 1.

    Characters are those of the decoded text that are whole (U+FFFD, a cut UTF-8 sequence, is not counted);
    UTF-8 bytes per second (from the tokens' byte lengths) is printed too, since it does not depend on the
    output being valid text.
    """
    from tinychat.infer.generate import generate
    from tinychat.infer.sampling import SamplingParams
    from tinychat.tokenizer.bytes import token_byte_lengths

    arms = {arm: load(out / "models" / f"{arm}_final") for arm in ("ctl", "ext")}
    starts = [t[:12] for t in texts(out / "data" / "val.zh.jsonl")[:prompts]]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_on_eos=False, seed=0)
    totals = {arm: [0.0, 0, 0, 0] for arm in arms}  # seconds, characters, tokens, bytes
    nbytes = {arm: token_byte_lengths(tok) for arm, (_, tok) in arms.items()}
    for model, tok in arms.values():  # warm-up
        generate(model, tok, [starts[0]], SamplingParams(temperature=0.0, max_new_tokens=8, stop_on_eos=False))
    for _ in range(rounds):
        for arm, (model, tok) in arms.items():  # the arms alternate, so a change of machine load hits both
            for p in starts:
                t0 = time.perf_counter()
                g = generate(model, tok, [p], params)[0]
                totals[arm][0] += time.perf_counter() - t0
                totals[arm][1] += len(g.text.replace("\ufffd", ""))
                totals[arm][2] += len(g.token_ids)
                totals[arm][3] += sum(nbytes[arm][i] for i in g.token_ids if i < len(nbytes[arm]))
    speed = {arm: (c / s, t / s, b / s) for arm, (s, c, t, b) in totals.items()}
    for arm, (cps, tps, bps) in speed.items():
        print(f"{arm}: {cps:,.1f} characters/s, {bps:,.1f} UTF-8 bytes/s, {tps:,.1f} tokens/s")
    ctl, ext = speed["ctl"], speed["ext"]
    chars = f"{ext[0] / ctl[0]:.2f}x" if ctl[0] else "n/a (the control wrote no whole characters)"
    print(f"Chinese generation, extended / control: {chars} characters/s, {ext[2] / ctl[2]:.2f}x bytes/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/vocab-demo"))
    ap.add_argument(
        "--scale",
        type=float,
        default=0.25,
        help="multiply every stage's steps (base 300, stage 1 150, stage 2 300, SFT 150 at 1.0); 0.25 is the default "
        "so the whole run fits a busy 2-core machine, 0.1 is a smoke run",
    )
    ap.add_argument("--add", type=int, default=2048, help="new Chinese tokens")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset itself (~4x the default's compute)")
    ap.add_argument("--replay", type=float, default=0.2, help="share of English text in continued pretraining")
    ap.add_argument("--sft-lr", type=float, default=5e-4, help="SFT learning rate (both arms)")
    ap.add_argument("--sft-replay", type=float, default=0.0, help="share of English rows in the SFT data")
    ap.add_argument(
        "--sft-adapter-only", action="store_true", help="SFT trains LoRA only (embeddings and output layer frozen)"
    )
    ap.add_argument("--base-zh", type=float, default=0.0, help="share of Chinese text in the base model's pretraining")
    ap.add_argument("--measure-only", action="store_true", help="re-measure an existing --out")
    ap.add_argument("--stage1-only", action="store_true", help="stop after stage 1: the mean-vs-random curves only")
    ap.add_argument("--time", action="store_true", help="only time Chinese generation of an existing --out")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    try:
        if a.time:
            timing(a.out, a.prompts, a.max_new, a.rounds)
            return 0
        if not a.measure_only:
            if a.out.exists():
                shutil.rmtree(a.out)
            t0 = time.perf_counter()
            sft = (a.sft_replay, a.sft_adapter_only, a.sft_lr)
            pipeline(a.out, a.scale, a.add, a.tiny, a.replay, a.base_zh, a.stage1_only, *sft)
            print(f"\npipeline: {(time.perf_counter() - t0) / 60:.1f} min")
        if a.stage1_only:
            print(stage1_table(a.out))
            return 0
        t0 = time.perf_counter()
        r = measure(a.out)
        print(f"measurements: {(time.perf_counter() - t0) / 60:.1f} min\n")
        print(table(r))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
