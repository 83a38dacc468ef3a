"""`tinychat chat`: a chat in the terminal, streamed token by token, with the conversation's history.

It runs the same engine as the server, in-process (no HTTP), so what you see here is what the server
would answer. When the history outgrows the context window the oldest turns are dropped.
Commands: /reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits;
Ctrl-C stops the reply being written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from tinychat.config import field


@dataclass
class ChatConfig:
    model: str = field("", help="model directory or hub id; default: the newest runs/*/checkpoints/*/")
    system: str = field("", help="system prompt")
    temperature: float = field(0.7, help="0 = greedy")
    top_p: float = field(0.95)
    max_tokens: int = field(256, help="longest reply in tokens")
    seed: int | None = field(None)
    runs_dir: str = field("runs", help="where to look for speedrun models when --model is not given")
    device: str = field("auto")
    dtype: str = field("auto")


def fit_history(tok, messages: list[dict], max_prompt: int) -> list[int]:  # noqa: ANN001
    """Prompt ids of the conversation, dropping the oldest non-system turns until it fits."""
    msgs = list(messages)
    while True:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
        if len(ids) <= max_prompt or len(turns) <= 1:
            return ids[-max_prompt:]
        del msgs[turns[0]]


def chat_loop(engine, tok, cfg: ChatConfig, stdin: TextIO, stdout: TextIO) -> None:  # noqa: ANN001
    from tinychat.infer.engine import Delta, GenerationRequest
    from tinychat.infer.sampling import SamplingParams

    system = cfg.system
    history: list[dict] = []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            history = []
            stdout.write("(conversation forgotten)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip()
            stdout.write(f"(system prompt {'set' if system else 'cleared'})\n")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        max_new = min(cfg.max_tokens, engine.context // 2)
        ids = fit_history(tok, messages, engine.context - max_new)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new, seed=cfg.seed)
        handle = engine.submit(GenerationRequest(ids, params))
        reply = []
        stdout.write("assistant> ")
        try:
            for ev in handle:
                if isinstance(ev, Delta) and ev.text:
                    reply.append(ev.text)
                    stdout.write(ev.text)
                    stdout.flush()
        except KeyboardInterrupt:
            handle.cancel()
            stdout.write(" [stopped]")
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def run(cfg: ChatConfig) -> int:
    from tinychat.infer.engine import Engine, EngineConfig
    from tinychat.serve.cli import load

    model, tok, path = load(cfg.model, cfg.runs_dir, cfg.device, cfg.dtype)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=1)).start()
    print(f"chatting with {path} ({model.num_params() / 1e6:.1f}M parameters); /reset, /system TEXT, /exit")
    try:
        chat_loop(engine, tok, cfg, sys.stdin, sys.stdout)
    finally:
        engine.stop()
    return 0
