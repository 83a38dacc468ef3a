"""The install extras: the core works without any of them, and a missing one gets the pip command.

The core check runs in a fresh interpreter whose import system refuses every module an extra provides
(as an environment with only `pip install tinychat` would), then trains, generates and serves a tiny
model there; commands of an extra must exit 2 with one sentence naming `pip install 'tinychat[EXTRA]'`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from helpers import tiny_corpus

from tinychat.extras import PROVIDED_BY, missing_extra_message

ROOT = Path(__file__).resolve().parents[1]


def _requirement_name(req: str) -> str:
    return re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0].lower()


def test_extras_table_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = {
        (_requirement_name(r), name)
        for name in ("data", "rag", "agent", "eval", "all")
        for r in extras[name]
        if not r.startswith("tinychat[")
    }
    assert declared == {(dist, extra) for dist, extra in PROVIDED_BY.values()}
    assert extras["all"][0] == "tinychat[data,rag,agent,eval]"
    core = {_requirement_name(r) for r in project["dependencies"]}
    assert not core & {dist for dist, _ in PROVIDED_BY.values()}, "a package is both core and an extra"
    assert "tinychat[all]" in extras["dev"], "the tests need every extra"


def test_missing_extra_message_names_the_pip_command() -> None:
    msg = missing_extra_message(ModuleNotFoundError("No module named 'lancedb.index'", name="lancedb.index"))
    assert msg == "this command needs lancedb, from tinychat's 'rag' extra: pip install 'tinychat[rag]'."
    assert missing_extra_message(ModuleNotFoundError("x", name="no_such_thing")) is None


SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from tinychat.extras import PROVIDED_BY

    class RefuseExtras:  # what an environment with only the core dependencies looks like to Python
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in PROVIDED_BY:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, RefuseExtras())
    from tinychat.cli import main

    def call(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(list(argv))
        return rc, err.getvalue()

    tmp = sys.argv[1]
    out = {}
    tiny = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.n_kv_head", "1",
            "--model.head_dim", "16", "--model.d_ff", "64", "--model.max_seq_len", "64"]
    out["tokenizer"] = call("tokenizer", "train", "--input", f"{tmp}/c.jsonl", "--vocab-size", "300",
                            "--out", f"{tmp}/runs/r/tokenizer")
    out["tokenize"] = call("data", "tokenize", f"{tmp}/c.jsonl", "--tokenizer", f"{tmp}/runs/r/tokenizer",
                           "--out", f"{tmp}/runs/r/data/tokens", "--val-fraction", "0.1", "--workers", "1")
    out["pretrain"] = call("pretrain", "--runs-dir", f"{tmp}/runs", "--run", "r", *tiny, "--train.batch_size", "2",
                           "--train.seq_len", "32", "--train.max_steps", "3", "--train.eval_every", "0",
                           "--train.precision", "fp32", "--train.tensorboard", "false", "--samples")
    model_dir = sys.argv[2]
    out["generate"] = call("generate", "--model", model_dir, "--prompt", "The", "--max-new-tokens", "4", "--seed", "0")
    from fastapi.testclient import TestClient
    from tinychat.infer.engine import Engine, EngineConfig
    from tinychat.model.transformer import Model
    from tinychat.serve.app import create_app
    from tinychat.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(model_dir)
    engine = Engine(Model.from_pretrained(model_dir), tok, EngineConfig()).start()
    with TestClient(create_app(engine, tok, "tiny")) as client:
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 3})
    engine.stop()
    out["serve"] = [reply.status_code, reply.text]
    out["rag"] = call("rag", "ingest", f"{tmp}/c.jsonl", "--kb", f"{tmp}/kb")
    out["agent"] = call("agent", "hello", "--model", model_dir)
    out["parquet"] = call("data", "prepare", f"{tmp}/c.jsonl", "--out", f"{tmp}/prep", "--workers", "1")
    out["loaded"] = [0, sorted(m for m in sys.modules if m.split(".")[0] in PROVIDED_BY)]
    print(json.dumps(out))
    """
)


def test_core_runs_without_any_extra(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus(300)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(tmp_path / "runs/r/checkpoints/pretrain")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for step in ("tokenizer", "tokenize", "pretrain", "generate"):
        assert out[step][0] == 0, (step, out[step][1][-2000:])
    assert out["serve"][0] == 200, out["serve"][1]
    for step, extra in (("rag", "rag"), ("agent", "agent"), ("parquet", "data")):
        rc, err = out[step]
        assert rc == 2, (step, err[-2000:])
        assert err.strip().endswith(f"pip install 'tinychat[{extra}]'."), (step, err)
        assert err.count("\n") == 1, (step, err)  # one sentence, no traceback
    assert out["loaded"][1] == []
