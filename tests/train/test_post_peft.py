"""--peft.method through the real CLI: a prompt-tuned SFT stage is a PEFT adapter directory that PEFT opens,
generate runs and the next stage starts from; IA3 writes merged weights + adapter; prefix tuning trains DPO
against its own base (adapters off) as the reference; resume restores virtual tokens exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from post_helpers import RUN, common, fresh_run, metrics

from tinychat.cli import main
from tinychat.model import Model

pytest_plugins = ("post_helpers",)  # its fixtures: toy_runs, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randint(16, 200, (2, 9))


def test_prompt_tuned_sft_is_an_adapter_directory_peft_opens(toy_runs: Path, capsys):
    run = fresh_run(toy_runs, "prompt")
    args = ["--train.max_steps", "8", "--train.lr", "3e-2", "--eval_rows", "0", "--peft.method", "prompt",
            "--peft.virtual_tokens", "6", "--peft.init_text", "reply:", "--stage", "sft"]  # fmt: skip
    assert main(["sft", *common(toy_runs, run.name), *args]) == 0
    out = capsys.readouterr().out
    assert "peft: prompt, 6 virtual tokens: 384 of" in out  # 6 x d_model 64
    stage = run / "checkpoints" / "sft"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in stage.iterdir()}
    assert not (stage / "config.json").exists()
    conf = json.loads((stage / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PROMPT_TUNING" and conf["prompt_tuning_init"] == "TEXT"
    loss = [r["loss"] for r in metrics(run, "sft")]
    assert loss[-1] < loss[0]
    ours = Model.from_pretrained(str(stage))  # model/hf.py opens the adapter: base + virtual tokens, unmerged
    with torch.no_grad():
        mine = ours.eval()(X)
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "pretrain", dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, stage).eval()(X).logits[:, 6:]
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=0)
    # generate opens the adapter directory; dpo (no --init) starts from it, and refuses to stack another prompt
    assert (
        main(["generate", "--model", str(stage), "--prompt", "hello", "--max_new_tokens", "4", "--temperature", "0"])
        == 0
    )
    capsys.readouterr()
    dpo = ["--train.max_steps", "1", "--peft.method", "prompt", "--peft.virtual_tokens", "2"]
    assert main(["dpo", *common(toy_runs, run.name), *dpo]) == 2
    assert "carries a prompt/prefix adapter" in capsys.readouterr().err


def test_ia3_sft_writes_merged_weights_and_the_adapter(toy_runs: Path):
    from tinychat.train.post import load_causal_lm

    args = ["--train.max_steps", "4", "--train.lr", "3e-2", "--eval_rows", "0", "--peft.method", "ia3",
            "--stage", "sft_ia3", "--init", str(toy_runs / RUN / "checkpoints" / "pretrain")]  # fmt: skip
    assert main(["sft", *common(toy_runs), *args]) == 0
    stage = toy_runs / RUN / "checkpoints" / "sft_ia3"
    conf = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "IA3" and conf["feedforward_modules"] == ["down_proj"]
    with torch.no_grad():
        merged = Model.from_pretrained(str(stage))(X)
        via_adapter = load_causal_lm(stage / "adapter")(X)
        base = Model.from_pretrained(str(toy_runs / RUN / "checkpoints" / "pretrain"))(X)
    torch.testing.assert_close(via_adapter, merged, atol=1e-5, rtol=0)
    assert (merged - base).abs().max() > 1e-4


def test_prefix_dpo_resumes_exactly(toy_runs: Path):
    """DPO with prefix tuning: its reference is the base with the prefix off; step checkpoints hold the
    re-parameterisation MLP, so --resume continues bit for bit."""
    args = ["dpo", *common(toy_runs, "prefix"), "--init", str(toy_runs / RUN / "checkpoints" / "pretrain"),
            "--data", str(toy_runs / RUN / "world" / "preference" / "train.jsonl"), "--peft.method", "prefix",
            "--peft.virtual_tokens", "4", "--train.max_steps", "4", "--train.checkpoint_every", "2"]  # fmt: skip
    assert main(args) == 0
    ref = metrics(toy_runs / "prefix", "dpo")
    shutil.rmtree(toy_runs / "prefix" / "checkpoints" / "dpo" / "step_000004")
    assert main([*args, "--resume"]) == 0
    assert [r["loss"] for r in metrics(toy_runs / "prefix", "dpo")] == [r["loss"] for r in ref]
    conf = json.loads((toy_runs / "prefix" / "checkpoints" / "dpo" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PREFIX_TUNING" and conf["prefix_projection"] is True


def test_unipelt_sft_through_the_cli(toy_runs: Path, capsys):
    """UniPELT trains its three gated parts on the one loop, its stage is a UNIPELT adapter directory that
    generate opens, and merge refuses it in one sentence."""
    args = ["--train.max_steps", "6", "--train.lr", "1e-2", "--eval_rows", "0", "--peft.method", "unipelt",
            "--peft.virtual_tokens", "3", "--stage", "sft_uni",
            "--init", str(toy_runs / RUN / "checkpoints" / "pretrain")]  # fmt: skip
    assert main(["sft", *common(toy_runs), *args]) == 0
    out = capsys.readouterr().out
    assert "gated lora rank 8 on 4 projections" in out  # q and v of 2 layers
    stage = toy_runs / RUN / "checkpoints" / "sft_uni"
    conf = json.loads((stage / "adapter_config.json").read_text())
    assert conf["peft_type"] == "UNIPELT" and conf["target_modules"] == ["q_proj", "v_proj"]
    assert conf["num_virtual_tokens"] == 3 and not (stage / "config.json").exists()
    loss = [r["loss"] for r in metrics(toy_runs / RUN, "sft_uni")]
    assert loss[-1] < loss[0]
    cmd = ["generate", "--model", str(stage), "--prompt", "hello", "--max_new_tokens", "4", "--temperature", "0"]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(["merge", "--adapter", str(stage), "--out", str(toy_runs / "uni_merged")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
