"""`tinychat eval`: bits per byte, tinyworld suites and lm-eval tasks for one model; the speedrun's eval stage.

    tinychat eval --model runs/x/checkpoints/sft --world runs/x/world --suite all --out sft.json
    tinychat eval --model DIR --suite bpb --data notes.jsonl           # perplexity on your own text
    tinychat eval --run x --stage sft                                  # a run's stage: paths by convention,
                                                                       # results appended to metrics.jsonl
    tinychat eval --model DIR --suite none --harness-tasks arc_easy    # EleutherAI lm-eval tasks

Results are printed as a table, written as JSON with --out, and with --run/--stage appended to the run's
metrics.jsonl as {"stage", "kind": "eval_suite", "suite", ...} lines (one per suite, bits per byte as
suite "bpb") plus the whole result with samples in runs/NAME/eval/STAGE.json, so `tinychat report`
builds the report card from files alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.eval.suites import DEFAULT_SUITES, SUITES, SuiteOptions


@dataclass
class EvalConfig:
    model: str = field("", help="model directory (HF layout, tokenizer inside); default RUNS_DIR/RUN/checkpoints/STAGE")
    suite: list[str] = field(
        ["all"],
        help=f"what to run: all (= bpb + {', '.join(DEFAULT_SUITES)}), bpb, none, passkey (long-context "
        f"retrieval, see --lengths), or suite names ({', '.join(SUITES)})",
    )
    lengths: list[int] = field([], help="passkey: prompt lengths in tokens (default 1x, 2x, 4x, 8x the trained length)")
    passkey_samples: int = field(20, help="passkey: prompts per length (key depths spread evenly)")
    mode: Literal["auto", "base", "chat"] = field(
        "auto", help="base: few-shot prompts; chat: the chat template; auto: base for pretrain or distill, else chat"
    )
    world: str = field("", help="tinyworld directory with eval/*.jsonl (default RUNS_DIR/RUN/world)")
    data: list[str] = field(
        [], help="text for bits per byte: a tokenized data dir or JSONL/txt files (default RUNS_DIR/RUN/data/tokens)"
    )
    limit: int = field(40, help="questions per suite (0 = all); the same first rows for every model")
    shots: int = field(3, help="solved examples in a base model's few-shot prompt")
    max_new_tokens: int = field(48, help="reply length limit")
    cot_max_new_tokens: int = field(
        SuiteOptions.cot_max_new_tokens,
        help="reply length limit for multistep questions, step by step or direct (a chat model may think before a "
        "direct answer); a worked sum of two populations is ~165 tokens (up to ~185) with its brackets",
    )
    max_tool_rounds: int = field(2, help="calculator calls a conversation may make before it must answer")
    tool_max_new_tokens: int = field(96, help="reply length limit in the tool suite (a call is ~45 tokens of JSON)")
    batch_size: int = field(64, help="questions generated together")
    seq_len: int = field(256, help="window length for bits per byte (capped at the context window)")
    bpb_tokens: int = field(16384, help="validation tokens scored for bits per byte (0 = all)")
    precision: Literal["fp32", "bf16", "auto"] = field(
        "fp32", help="fp32 (exact), bf16 autocast, or auto: bf16 where this machine's matmul probe shows it faster"
    )
    device: str = field("cpu")
    samples: int = field(3, help="graded example replies kept per suite in the JSON")
    out: str = field("", help="write the full results as JSON to this file")
    run: str = field("", help="run name: record results in RUNS_DIR/RUN/metrics.jsonl (with --stage)")
    runs_dir: str = field("runs")
    stage: str = field("", help="stage the model comes from (pretrain, sft, dpo, grpo, ...)")
    harness_tasks: list[str] = field([], help="lm-evaluation-harness task names (needs `pip install tinychat[eval]`)")
    harness_include: str = field("", help="a directory of lm-eval task YAML files to add to its registry")
    harness_defaults: bool = field(True, help="also index lm-eval's built-in tasks (off: only --harness-include)")
    harness_limit: int = field(0, help="examples per lm-eval task (0 = all)")
    harness_shots: int = field(-1, help="few-shot examples for lm-eval tasks (-1 = each task's default)")


# ---------------------------------------------------------------------------------------------- evaluation
def suite_names(requested: list[str]) -> tuple[bool, list[str]]:
    """(run bits per byte?, tinyworld suites) from --suite words."""
    words = [w for item in requested for w in item.split(",") if w]
    bpb, names = False, []
    for w in words:
        if w == "all":
            bpb = True
            names += [n for n in DEFAULT_SUITES if n not in names]
        elif w == "bpb":
            bpb = True
        elif w == "none":
            continue
        elif w in SUITES:
            names += [w] if w not in names else []
        else:
            raise UserError(f"--suite {w!r} is not known; use all, bpb, none or one of {', '.join(SUITES)}.")
    return bpb, names


def evaluate_model(
    model_dir: str | Path,
    *,
    suites: list[str] | tuple[str, ...] = DEFAULT_SUITES,
    bpb_data: list[str | Path] | None = None,
    world_dir: str | Path | None = None,
    mode: str = "auto",
    stage: str = "",
    opts: SuiteOptions | None = None,
    batch_size: int = 64,
    seq_len: int = 256,
    bpb_tokens: int = 16384,
    precision: str = "fp32",
    device: str = "cpu",
    harness: dict[str, Any] | None = None,
    passkey: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a model directory once and run bits per byte, the named suites and lm-eval tasks on it.

    Returns {"model", "mode", "params", "bpb": {...} | None, "suites": {name: result}, "harness": {...},
    "truncated_prompts", "seconds"}.
    """
    from tinychat.eval.backend import LocalCompleter, detect_mode, load
    from tinychat.eval.bpb import bits_per_byte
    from tinychat.eval.suites import run_suites
    from tinychat.model.packed import pack_linears

    t0 = time.perf_counter()
    model, tok = load(model_dir, device)
    # loaded for evaluation only: fused q/k/v and gate/up, and fp32 CPU projections over packed weights for the
    # suites' decode steps (model/packed.py; 1.3x a suite's greedy answers on the speedrun's shape)
    pack_linears(model.fuse_projections())
    if precision == "auto":  # the training loop's rule, so evaluation runs at the precision training chose
        import torch

        from tinychat.train.mfu import autocast_dtype

        precision = "bf16" if autocast_dtype(torch.device(device), "auto") == torch.bfloat16 else "fp32"
    resolved = detect_mode(model_dir, stage, tok) if mode == "auto" else mode
    if resolved not in ("base", "chat"):
        raise UserError(f"--mode must be auto, base or chat, got {mode!r}.")
    out: dict[str, Any] = {
        "model": str(model_dir),
        "stage": stage or None,
        "mode": resolved,
        "params": model.num_params(),
        "precision": precision,
        "bpb": None,
        "suites": {},
    }
    if bpb_data:
        rows = [bits_per_byte(model, tok, d, seq_len, bpb_tokens, precision=precision) for d in bpb_data]
        out["bpb"] = rows[0] if len(rows) == 1 else _merge_bpb(rows)
    if suites:
        if world_dir is None or not (Path(world_dir) / "eval").is_dir():
            raise UserError(
                f"no tinyworld eval sets at {world_dir}/eval; pass --world DIR (tinychat world generate writes one)."
            )
        completer = LocalCompleter(model, tok, batch_size, precision)
        out["suites"] = run_suites(completer, world_dir, list(suites), resolved, opts)  # type: ignore[arg-type]
        out["truncated_prompts"] = completer.truncated
    if passkey is not None:
        from tinychat.eval.passkey import run_passkey

        out["passkey"] = run_passkey(model, tok, **passkey, precision=precision)
    if harness and harness.get("tasks"):
        from tinychat.eval.harness import HarnessModel

        core = HarnessModel(model, tok, batch_size=min(batch_size, 32), precision=precision)
        out["harness"] = run_harness(core, str(model_dir), **harness)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _merge_bpb(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Several bits-per-byte sources pooled: total bits over total bytes, total nats over total tokens."""
    import math

    nats = sum(r["loss"] * r["tokens"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    n_bytes = sum(r["bytes"] for r in rows)
    return {
        "source": ", ".join(r["source"] for r in rows),
        "bpb": nats / math.log(2) / max(n_bytes, 1),
        "loss": nats / tokens,
        "ppl": math.exp(min(nats / tokens, 700.0)),
        "tokens": tokens,
        "bytes": n_bytes,
        "seq_len": rows[0]["seq_len"],
    }


def run_harness(
    core: Any,
    name: str,
    tasks: list[str],
    include: str = "",
    defaults: bool = True,
    limit: int = 0,
    shots: int = -1,
) -> dict[str, Any]:
    """lm-eval tasks through the "tinychat" model adapter: {task: {metric: value}} (numbers only)."""
    from tinychat.eval.harness import TinychatLM

    if TinychatLM is None:
        raise UserError("lm-evaluation-harness is not installed; `pip install 'tinychat[eval]'` (or lm-eval) first.")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include and not Path(include).is_dir():
        raise UserError(f"--harness-include {include} is not a directory.")
    lm = TinychatLM.from_core(core, name)
    manager = TaskManager(include_path=include or None, include_defaults=defaults)
    res = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit or None,
        num_fewshot=None if shots < 0 else shots,
        bootstrap_iters=0,  # lm-eval's bootstrap spawns a process pool; the point estimates are what we record
        log_samples=False,
    )
    results: dict[str, Any] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        nums = {
            k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if "sample_len" in nums:
            nums["n"] = nums.pop("sample_len")
        results[task] = nums
    return results


# ---------------------------------------------------------------------------------------------- recording
def metric_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of one evaluation (without stage/kind/step/time, which the log adds)."""
    common = {k: results.get(k) for k in ("model", "mode", "params", "precision")}
    recs = []
    if results.get("bpb"):
        b = results["bpb"]
        recs.append(
            {
                "suite": "bpb",
                **common,
                "val_bpb": b["bpb"],
                "val_loss": b["loss"],
                "val_ppl": b["ppl"],
                "val_tokens": b["tokens"],
                "seq_len": b["seq_len"],
                "source": b["source"],
            }
        )
    for name, r in results.get("suites", {}).items():
        recs.append({"suite": name, **common, **{k: v for k, v in r.items() if k not in ("samples", "suite")}})
    if results.get("passkey"):
        p = results["passkey"]
        by_len = {n: r["accuracy"] for n, r in p["lengths"].items()}
        recs.append({"suite": "passkey", **common, "trained_length": p["trained_length"], "accuracy": by_len})
    for task, metrics in (results.get("harness") or {}).items():
        acc = next((metrics[k] for k in ("acc", "exact_match", "acc_norm") if k in metrics), None)
        recs.append({"suite": f"lm_eval:{task}", **common, "accuracy": acc, "metrics": metrics})
    return recs


def record(run_dir: str | Path, stage: str, results: dict[str, Any]) -> None:
    """Append one {"stage", "kind": "eval_suite", ...} line per suite to metrics.jsonl; save eval/STAGE.json."""
    from tinychat.train.metrics import MetricsLog, read_metrics

    run_dir = Path(run_dir)
    train = read_metrics(run_dir, stage=stage, kind="train")
    step = int(train[-1].get("step", 0)) if train else 0  # the evaluated model is the stage's final step
    log = MetricsLog(run_dir, stage, enabled=True, tensorboard=False)
    for rec in metric_records(results):
        log.log(step, rec, kind="eval_suite")
    log.close()
    write_json(run_dir / "eval" / f"{stage}.json", results)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the speedrun's call
def evaluate_stage(
    run_dir: str | Path,
    stage: str,
    model_dir: str | Path | None = None,
    world_dir: str | Path | None = None,
    mode: str = "auto",
    limit: int = 40,
    suites: list[str] | tuple[str, ...] = DEFAULT_SUITES,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a run's stage and record it: bits per byte on runs/NAME/data/tokens (val split) and the suites
    on runs/NAME/world, appended to metrics.jsonl; also writes eval/STAGE.json and environment.json.

    model_dir defaults to runs/NAME/checkpoints/STAGE; mode "auto" is base for pretrain, chat otherwise.
    `options` are EvalConfig fields (max_new_tokens, batch_size, bpb_tokens, seq_len, precision, ...).
    """
    from tinychat.eval import environment

    run_dir = Path(run_dir)
    model_dir = Path(model_dir) if model_dir else run_dir / "checkpoints" / stage
    world_dir = Path(world_dir) if world_dir else run_dir / "world"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no model at {model_dir}; train stage {stage!r} first.")
    data = options.pop("data", None) or (
        [run_dir / "data" / "tokens"] if (run_dir / "data" / "tokens").is_dir() else []
    )
    unknown = sorted(set(options) - set(EvalConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"evaluate_stage() got unknown option(s) {', '.join(unknown)}; see EvalConfig.")
    cfg = EvalConfig(limit=limit, **options)
    results = evaluate_model(
        model_dir,
        suites=suites,
        bpb_data=list(data),
        world_dir=world_dir,
        mode=mode,
        stage=stage,
        opts=_suite_options(cfg),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        bpb_tokens=cfg.bpb_tokens,
        precision=cfg.precision,
        device=cfg.device,
    )
    environment.record(run_dir)
    record(run_dir, stage, results)
    return results


def _suite_options(cfg: EvalConfig) -> SuiteOptions:
    return SuiteOptions(
        limit=cfg.limit,
        shots=cfg.shots,
        max_new_tokens=cfg.max_new_tokens,
        cot_max_new_tokens=cfg.cot_max_new_tokens,
        max_tool_rounds=cfg.max_tool_rounds,
        tool_max_new_tokens=cfg.tool_max_new_tokens,
        samples=cfg.samples,
    )


# ---------------------------------------------------------------------------------------------- printing and CLI
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def format_table(results: dict[str, Any]) -> str:
    """The console table: one line per suite with per-language (and per-mode, tool) columns."""
    lines = [f"model {results['model']}  mode {results['mode']}  params {results['params']:,}"]
    b = results.get("bpb")
    if b:
        lines.append(
            f"bits per byte {b['bpb']:.4f}  loss {b['loss']:.4f}  perplexity {b['ppl']:.2f}  "
            f"({b['tokens']:,} tokens of {b['source']})"
        )
    if results.get("suites"):
        lines.append(f"{'suite':<18} {'acc':>6} {'n':>4} {'en':>6} {'zh':>6}  notes")
        for name, r in results["suites"].items():
            lang = r.get("by_lang", {})
            notes = []
            for m, v in r.get("by_mode", {}).items():
                notes.append(f"{m} {_pct(v['accuracy']).strip()}")
            if "tool" in r:
                t = r["tool"]
                notes.append(f"tool use {_pct(t['use_rate']).strip()}, valid calls {_pct(t['validity_rate']).strip()}")
            if r.get("refused") is not None:
                notes.append(f"refused {_pct(r['refused']).strip()}")
            lines.append(
                f"{name:<18} {_pct(r['accuracy']):>6} {r['n']:>4} {_pct(lang.get('en', {}).get('accuracy')):>6} "
                f"{_pct(lang.get('zh', {}).get('accuracy')):>6}  {'; '.join(notes)}"
            )
    if results.get("passkey"):
        from tinychat.eval.passkey import format_passkey

        lines.append(format_passkey(results["passkey"]))
    for task, metrics in (results.get("harness") or {}).items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "stderr" not in k)
        lines.append(f"lm-eval {task}: {shown}")
    if results.get("truncated_prompts"):
        lines.append(f"note: {results['truncated_prompts']} prompts were cut from the left to fit the context window")
    lines.append(f"({results['seconds']:.1f} s)")
    return "\n".join(lines)


def run(cfg: EvalConfig) -> int:
    run_dir = Path(cfg.runs_dir) / cfg.run if cfg.run else None
    if cfg.run and not cfg.stage:
        raise UserError("--run needs --stage (the stage the model comes from) to record results.")
    if cfg.model:
        model_dir = Path(cfg.model)
    elif run_dir is not None:
        model_dir = run_dir / "checkpoints" / cfg.stage
    else:
        raise UserError("give --model DIR (or --run NAME --stage STAGE for a run's checkpoint).")
    words = [w for item in cfg.suite for w in item.split(",") if w]
    passkey = {"lengths": cfg.lengths or None, "samples": cfg.passkey_samples} if "passkey" in words else None
    bpb, names = suite_names([w for w in words if w != "passkey"] or ["none"])
    world = Path(cfg.world) if cfg.world else (run_dir / "world" if run_dir else None)
    data: list[str | Path] = list(cfg.data)
    if bpb and not data and run_dir is not None and (run_dir / "data" / "tokens").is_dir():
        data = [run_dir / "data" / "tokens"]
    if bpb and not data:
        if "bpb" in [w for item in cfg.suite for w in item.split(",")]:
            raise UserError("--suite bpb needs validation text: --data DIR_OR_FILES (or --run NAME with data/tokens).")
        print("note: no --data given, so no bits per byte (only the suites)", file=sys.stderr)
    harness = None
    if cfg.harness_tasks:
        harness = {
            "tasks": cfg.harness_tasks,
            "include": cfg.harness_include,
            "defaults": cfg.harness_defaults,
            "limit": cfg.harness_limit,
            "shots": cfg.harness_shots,
        }
    if names and world is None:
        raise UserError("the tinyworld suites need --world DIR (or --run NAME); use --suite bpb for text only.")
    results = evaluate_model(
        model_dir,
        suites=names,
        bpb_data=data if bpb else None,
        world_dir=world,
        mode=cfg.mode,
        stage=cfg.stage,
        opts=_suite_options(cfg),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        bpb_tokens=cfg.bpb_tokens,
        precision=cfg.precision,
        device=cfg.device,
        harness=harness,
        passkey=passkey,
    )
    print(format_table(results))
    if cfg.out:
        write_json(Path(cfg.out), results)
        print(f"results -> {cfg.out}")
    if run_dir is not None:
        from tinychat.eval import environment

        environment.record(run_dir)
        record(run_dir, cfg.stage, results)
        print(f"recorded in {run_dir / 'metrics.jsonl'} as stage {cfg.stage}")
    return 0
