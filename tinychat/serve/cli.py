"""`tinychat serve`: the OpenAI-compatible server and web chat for a model directory.

Without --model it serves the newest model the speedrun produced: the most recently modified
`runs/*/checkpoints/*/` directory that holds a config.json (a run directory's layout, see
docs/architecture.md). The tokenizer is read from the model directory, or else from the run's
`tokenizer/` directory.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tinychat.config import field
from tinychat.device import usable_cores
from tinychat.errors import UserError
from tinychat.infer.locate import find_latest_model, how_to_get_one, resolve_model, tokenizer_dir  # noqa: F401


@dataclass
class ServeConfig:
    model: str = field("", help="model directory (HF layout) or hub id; default: the newest runs/*/checkpoints/*/")
    host: str = field("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    port: int = field(8000)
    api_key: str = field("", help="require 'Authorization: Bearer KEY' on /v1/* (default: open)")
    served_model_name: str = field("", help="the model id clients use (default: the directory's name, or the hub id)")
    adapter: list[str] = field(
        [], help="LoRA adapters served beside the base, NAME=DIR ...: a request's model field picks one by NAME"
    )
    adapter_batching: Literal["mask", "gather", "group"] = field(
        "mask", help="how rows of different adapters share a batch: mask, gather or group (docs/peft.md)"
    )
    adapter_updates: str = field(
        "",
        help="a directory: POST /v1/load_lora_adapter and /v1/unload_lora_adapter may load LoRA adapters from "
        "under it while serving (default: off)",
    )
    max_adapters: int = field(0, help="LoRA adapter slots (0: as many as --adapter, at least 4 with --adapter_updates)")
    max_adapter_rank: int = field(
        0, help="the slots' LoRA rank with --adapter_updates (0: 16, or the largest --adapter's)"
    )
    max_num_seqs: int = field(16, help="sequences decoded at once (KV-cache slots)")
    max_model_len: int = field(0, help="positions per sequence, prompt + output (0: the model's context)")
    kv_cache_mb: float = field(0.0, help="cap on KV-cache memory in MB; fewer slots when tight (0: no cap)")
    max_queue: int = field(256, help="requests waiting for a slot before the server answers 429")
    prefill_chunk: int = field(256, help="prompt tokens per prefill step (long prompts are split)")
    compile: bool = field(
        False, help="decode through torch.compile: faster per token, ~20 s to compile each new batch-size bucket"
    )
    decode_steps: int = field(
        4,
        help="with --compile: tokens per compiled call while no request waits and every running one samples "
        "with temperature and logit bias only (vLLM's multi-step scheduling); 1 = one per call",
    )
    pack_weights: bool = field(
        True,
        help="fp32 on a CPU: decode matmuls over a packed copy of the weights (model/packed.py; 1.3-2.2x tokens/s "
        "on 2 cores, docs/engine.md); false saves that copy's memory (the fp32 weights' size)",
    )
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(
        "auto",
        help="the KV cache's dtype: auto (the model's compute dtype) or a 16-bit one, half the memory per token "
        "(llama.cpp's default cache type; docs/engine.md measures what it costs)",
    )
    prefill_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(
        "auto",
        help="run prompts on a copy of the weights in this dtype and decode in the model's: bfloat16 prefills a "
        "burst of prompts 2x faster on a CPU with AVX-512 BF16 or AMX, at bf16 precision for the prompt's keys "
        "and values and 1.5x the weights' memory (docs/engine.md); auto: the model's dtype",
    )
    threads: int = field(
        0, help="CPU threads for the model's kernels (0: torch's default less one core, kept for HTTP and streaming)"
    )
    engine_process: bool = field(
        True,
        help="run the engine in a process of its own, beside the HTTP server's (vLLM v1's split): 1.1-1.6x the "
        "tokens/s at 16-64 clients on 2 cores (docs/engine.md); false keeps it in the server's process",
    )
    runs_dir: str = field("runs", help="where to look for speedrun models when --model is not given")
    device: str = field("auto")
    dtype: str = field("auto")
    kb: str = field("", help="knowledge-base directory: adds /v1/rag/* and answers from it (see tinychat rag)")
    reasoning: bool = field(
        True,
        help="return a chat reply's leading <think> block as message.reasoning_content (DeepSeek's and vLLM's "
        "field); false leaves it inside content",
    )
    max_body_mb: float = field(16.0, help="largest request body in MB, document uploads included (413 beyond)")
    allow_unauthenticated_writes: bool = field(
        False, help="let anyone upload and delete documents on a non-loopback --host without --api-key"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def write_policy(cfg: ServeConfig) -> tuple[bool, str | None]:
    """(may unauthenticated clients upload and delete documents, the warning to print at start or None).

    Why: a server reachable from other machines without a key lets anyone use it; that is a choice for
    reading, but changing the knowledge base (or emptying it) must be asked for explicitly."""
    if cfg.api_key or is_loopback(cfg.host):
        return True, None
    warning = (
        f"WARNING: listening on {cfg.host} without --api-key: anyone who can reach port {cfg.port} can use this server."
    )
    if cfg.allow_unauthenticated_writes:
        return True, warning + " --allow-unauthenticated-writes: anyone can upload and delete documents."
    if cfg.kb:
        warning += (
            " Uploading and deleting documents is refused (403); set --api-key KEY, or pass "
            "--allow-unauthenticated-writes to allow it anyway."
        )
    return False, warning


def kernel_threads(requested: int) -> int:
    """The intra-op threads the engine's kernels get: `requested`, or by default torch's own choice less one
    core, at least one.

    Why: the HTTP server, the tokenizer and the streaming of every token run on Python threads of the same
    process. With as many kernel threads as cores, each small kernel's parallel region waits for a core that
    one of those threads holds. On a 2-core machine one kernel thread served 1.3x to 1.4x the tokens/s of two
    at 16 clients (bench/serve.py, docs/engine.md); vLLM's CPU backend likewise keeps a core for its front end.
    """
    if requested < 0:
        raise UserError(f"--threads must be 0 (automatic) or a positive number, got {requested}.")
    if requested:
        return requested
    return max(1, min(torch.get_num_threads(), usable_cores() - 1))


def load(model: str, runs: str, device: str, dtype: str):  # noqa: ANN201 - (Model, Tokenizer, Path)
    from tinychat.device import pick_device, pick_dtype
    from tinychat.model import Model
    from tinychat.tokenizer import Tokenizer

    path = resolve_model(model, runs)
    dev = pick_device(device)
    m = Model.from_pretrained(str(path), dtype=pick_dtype(dtype, dev), device=str(dev))
    return m, Tokenizer.from_pretrained(tokenizer_dir(path)), path


def parse_adapters(items: list[str], base_name: str) -> dict[str, str]:
    """--adapter NAME=DIR ... as {name: dir}; a UserError for a malformed, repeated or reserved name."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not name or not path:
            raise UserError(f"--adapter expects NAME=DIR (e.g. --adapter support=runs/s1/lora), got {item!r}.")
        if name in out or name == base_name:
            raise UserError(f"--adapter: the name {name!r} is used twice (the base model is served as {base_name!r}).")
        out[name] = path
    return out


def load_adapters(model, cfg: ServeConfig, base_name: str):  # noqa: ANN001, ANN201 - (Model, ...) -> AdapterSet | None
    """Wrap `model` to serve the --adapter LoRA adapters in shared batches (model/peft/multi_lora.py), with free
    slots for adapters loaded later when --adapter_updates is given; None without either."""
    from tinychat.model.peft.multi_lora import serve_adapters

    named = parse_adapters(cfg.adapter, base_name)
    if cfg.max_adapters < 0 or cfg.max_adapter_rank < 0:
        raise UserError("--max_adapters and --max_adapter_rank must be >= 0.")
    if not cfg.adapter_updates:
        if cfg.max_adapters or cfg.max_adapter_rank:
            raise UserError("--max_adapters and --max_adapter_rank size the slots of --adapter_updates; add it.")
        return serve_adapters(model, named, cfg.adapter_batching) if named else None
    if not Path(cfg.adapter_updates).is_dir():
        raise UserError(f"--adapter_updates {cfg.adapter_updates}: no such directory.")
    capacity = cfg.max_adapters or max(4, len(named))
    return serve_adapters(model, named, cfg.adapter_batching, capacity, cfg.max_adapter_rank or 16)


def check_adapter_updates(cfg: ServeConfig) -> None:
    """Loading adapters changes what the server runs: like document writes, it needs a key beyond loopback."""
    if cfg.adapter_updates and not write_policy(cfg)[0]:
        raise UserError(
            f"--adapter_updates on --host {cfg.host} would let anyone load adapters; set --api_key "
            "(or --allow_unauthenticated_writes)."
        )


def engine_config(cfg: ServeConfig):  # noqa: ANN201 - EngineConfig
    from tinychat.infer.engine import EngineConfig

    for name in ("max_num_seqs", "max_queue", "prefill_chunk", "decode_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    return EngineConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_model_len=cfg.max_model_len or None,
        kv_cache_mb=cfg.kv_cache_mb or None,
        max_queue=cfg.max_queue,
        prefill_chunk=cfg.prefill_chunk,
        compile=cfg.compile,
        decode_steps=cfg.decode_steps,
        pack_weights=cfg.pack_weights,
        kv_cache_dtype=cfg.kv_cache_dtype,
        prefill_dtype=cfg.prefill_dtype,
    )


def build_engine(cfg: ServeConfig, path: Path, name: str):  # noqa: ANN201 - Engine, not started
    """The engine `serve` runs, with its adapters: in this process, or in the engine process (engine_process.py),
    which calls this there."""
    from tinychat.infer.engine import Engine

    model, tok, _ = load(str(path), cfg.runs_dir, cfg.device, cfg.dtype)
    return Engine(model, tok, engine_config(cfg), load_adapters(model, cfg, name))


def run(cfg: ServeConfig) -> int:
    import sys

    import uvicorn

    from tinychat.model.hub import model_name
    from tinychat.serve.app import create_app
    from tinychat.serve.engine_process import EngineProcess
    from tinychat.tokenizer import Tokenizer

    threads = kernel_threads(cfg.threads)
    check_adapter_updates(cfg)
    path = resolve_model(cfg.model, cfg.runs_dir)
    name = cfg.served_model_name or model_name(path)
    if cfg.engine_process:
        engine = EngineProcess(build_engine, cfg, path, name, threads=threads)
        tok = Tokenizer.from_pretrained(tokenizer_dir(path))
    else:
        engine = build_engine(cfg, path, name)
        tok = engine.tok
        torch.set_num_threads(threads)  # for the whole process, so only once everything has loaded
        engine.start()
    adapters = engine.adapters
    kb = None
    if cfg.kb:
        from tinychat.rag.kb import KbSettings, KnowledgeBase

        kb = KnowledgeBase(cfg.kb, KbSettings())  # created empty when new: fill it by upload or `tinychat rag ingest`
    writes, warning = write_policy(cfg)
    if warning:
        print(f"\n{'!' * 100}\n{warning}\n{'!' * 100}\n", file=sys.stderr)
    app = create_app(
        engine,
        tok,
        name,
        api_key=cfg.api_key or None,
        kb=kb,
        max_body_mb=cfg.max_body_mb,
        allow_writes=writes,
        adapter_root=Path(cfg.adapter_updates) if cfg.adapter_updates else None,
        reasoning=cfg.reasoning,
    )
    print(
        f"serving {path} as '{name}' ({engine.model.num_params() / 1e6:.1f}M parameters, {engine.num_slots} slots "
        f"of {engine.context} tokens, {threads} kernel threads"
        + (", engine in its own process" if cfg.engine_process else "")
        + f") on http://{cfg.host}:{cfg.port}/  "
        "(OpenAI API under /v1)"
        + (f"; LoRA adapters: {', '.join(adapters.served)}" if adapters and adapters.served else "")
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.stop()
    return 0
