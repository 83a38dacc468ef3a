"""`tinychat serve` finds the speedrun's newest model; `tinychat chat` streams a conversation in the terminal."""

from __future__ import annotations

import io
import os
import shutil

import pytest
import torch

from tinychat.cli import main
from tinychat.errors import UserError
from tinychat.infer.engine import Delta, Done, Engine, EngineConfig
from tinychat.model import Model
from tinychat.serve.cli import (
    ServeConfig,
    build_engine,
    engine_config,
    find_latest_model,
    how_to_get_one,
    kernel_threads,
    resolve_model,
    tokenizer_dir,
)
from tinychat.serve.terminal import ChatConfig, chat_loop, show_reply
from tinychat.tokenizer import Tokenizer


def test_newest_speedrun_checkpoint_is_served(tmp_path, model_dir):
    runs = tmp_path / "runs"
    assert find_latest_model(runs) is None
    with pytest.raises(UserError) as e:
        resolve_model("", str(runs))
    assert str(e.value) == how_to_get_one(str(runs))
    for i, (run, stage) in enumerate([("a", "pretrain"), ("b", "sft"), ("a", "sft")]):
        d = runs / run / "checkpoints" / stage
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        os.utime(d / "config.json", (1000 + i, 1000 + i))
    (runs / "a" / "checkpoints" / "notes").mkdir()  # no config.json: not a model
    assert find_latest_model(runs) == runs / "a" / "checkpoints" / "sft"
    # the tokenizer comes from the model directory, else from the run's tokenizer/
    shutil.copy(model_dir / "tokenizer.json", runs / "a" / "tokenizer.json")
    with pytest.raises(UserError, match="no tokenizer.json"):
        tokenizer_dir(runs / "a" / "checkpoints" / "sft")
    (runs / "a" / "tokenizer").mkdir()
    shutil.copy(model_dir / "tokenizer.json", runs / "a" / "tokenizer" / "tokenizer.json")
    assert tokenizer_dir(runs / "a" / "checkpoints" / "sft") == runs / "a" / "tokenizer"
    assert tokenizer_dir(model_dir) == model_dir
    with pytest.raises(UserError, match="config.json"):
        resolve_model(str(tmp_path))


def test_serve_and_chat_commands_are_registered(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--api_key" in out and "--max_num_seqs" in out
    assert main(["chat", "--help"]) == 0
    assert main(["serve", "--runs-dir", "/nonexistent/runs"]) == 2
    assert "run `tinychat speedrun` to train one" in capsys.readouterr().err


def test_serve_passes_the_kv_cache_dtype_and_refuses_others(model_dir, capsys):
    cfg = ServeConfig(model=str(model_dir), kv_cache_dtype="bfloat16", dtype="float32", max_num_seqs=2)
    assert engine_config(cfg).kv_cache_dtype == "bfloat16"
    engine = build_engine(cfg, model_dir, "tiny")
    assert engine.cache.dtype == torch.bfloat16 and engine.compute_dtype == torch.float32
    assert main(["serve", "--model", str(model_dir), "--kv_cache_dtype", "int8"]) == 2
    assert "kv_cache_dtype" in capsys.readouterr().err


def test_serve_keeps_a_core_for_http_unless_told(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert kernel_threads(0) == 1  # two cores: one for the kernels, one for HTTP and streaming
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert kernel_threads(0) == 1  # never zero
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert kernel_threads(0) == min(torch.get_num_threads(), 63)  # no more than torch's own choice
    assert kernel_threads(3) == 3
    with pytest.raises(UserError, match="--threads must be 0"):
        kernel_threads(-1)
    threads = torch.get_num_threads()
    assert main(["serve", "--threads", "-2"]) == 2
    assert "--threads must be 0" in capsys.readouterr().err
    assert torch.get_num_threads() == threads  # refused before anything changed


def test_terminal_chat_streams_and_keeps_history(model_dir):
    model, tok = Model.from_pretrained(str(model_dir)), Tokenizer.from_pretrained(model_dir)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=1)).start()
    seen: list[list[dict]] = []
    real = tok.apply_chat_template

    def spy(messages, **kw):
        seen.append([dict(m) for m in messages])
        return real(messages, **kw)

    tok.apply_chat_template = spy
    try:
        stdin = io.StringIO("Hello!\n/system Be brief.\nAnd then?\n/reset\nNew topic.\n/exit\nnever read\n")
        stdout = io.StringIO()
        chat_loop(engine, tok, ChatConfig(max_tokens=8, temperature=0), stdin, stdout)
    finally:
        engine.stop()
    out = stdout.getvalue()
    assert out.count("assistant> ") == 3 and "(system prompt set)" in out and "(conversation forgotten)" in out
    roles = [[m["role"] for m in msgs] for msgs in seen]
    assert roles == [["user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert seen[1][2]["content"] in out  # the reply shown is the one kept in the history


def test_terminal_chat_shows_the_reasoning_apart():
    reply = '<think>\nIt is headquartered in Dalzan.\n</think>\n\n{"answer": "Dalzan"}'
    cuts = [reply[:3], reply[3:20], reply[20:41], reply[41:]]  # "</think>" falls across two deltas
    stdout, kept = io.StringIO(), []
    show_reply([Delta(0, c) for c in cuts[:-1]] + [Delta(0, cuts[-1], finish_reason="stop"), Done(3, 9)], stdout, kept)
    assert stdout.getvalue() == '(thinking) It is headquartered in Dalzan.\n{"answer": "Dalzan"}'
    assert "".join(kept) == reply  # the history keeps the reply as written: the template renders the same tokens
    stdout, kept = io.StringIO(), []
    show_reply([Delta(0, "Dal"), Delta(0, "zan.", finish_reason="stop")], stdout, kept)
    assert stdout.getvalue() == "Dalzan." and kept == ["Dal", "zan."]
    stdout = io.StringIO()
    show_reply([Delta(0, "<think>\nStill thinking </th")], stdout, [])  # stopped: the held-back tail is shown too
    assert stdout.getvalue() == "(thinking) Still thinking </th"
