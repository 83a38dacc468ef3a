"""`tinychat chat`: a chat in the terminal, streamed token by token, with the conversation's history.

It runs the same engine as the server, in-process (no HTTP), so what you see here is what the server
would answer. When the history outgrows the context window the oldest turns are dropped.
Commands: /reset forgets the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits;
Ctrl-C stops the reply being written. A reply's leading <think> block is shown apart, after "(thinking) ",
as the server returns it in reasoning_content; the history keeps the reply as written, which the template
renders to the same tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from tinychat.config import field
from tinychat.serve.reasoning import ReasoningSplitter


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


def show_reply(events: Iterable[Any], stdout: TextIO, reply: list[str]) -> None:
    """Write a reply's deltas as they come, its reasoning on a line of its own, and append their text to `reply`
    (so a reply stopped with Ctrl-C keeps what was written). Events other than deltas (Done) are skipped."""
    from tinychat.infer.engine import Delta

    splitter, state = ReasoningSplitter(), "start"  # start -> (thinking ->) answer

    def write(thought: str, answer: str) -> None:
        nonlocal state
        if thought:
            stdout.write(("(thinking) " if state == "start" else "") + thought)
            state = "thinking"
        if answer:
            stdout.write(("\n" if state == "thinking" else "") + answer)
            state = "answer"
        stdout.flush()

    try:
        for ev in events:
            if isinstance(ev, Delta):
                reply.append(ev.text)
                write(*splitter.feed(ev.text, final=ev.finish_reason is not None))
    finally:  # stopped with Ctrl-C: what was held back (a partial tag) is shown too
        write(*splitter.feed("", final=True))


def chat_loop(engine, tok, cfg: ChatConfig, stdin: TextIO, stdout: TextIO) -> None:  # noqa: ANN001
    from tinychat.infer.engine import GenerationRequest
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
        stdout.write("assistant> ")
        reply: list[str] = []
        try:
            show_reply(handle, stdout, reply)
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
