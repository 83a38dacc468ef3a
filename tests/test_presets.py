"""Every speedrun preset in configs/ builds every stage's config, so a preset that is only run on other hardware
(gpu-small: no GPU in CI) cannot rot: an unknown key, a wrong type or a renamed section fails here."""

from __future__ import annotations

import pytest

from tinychat.data.prepare import PrepareConfig
from tinychat.data.tokenize import TokenizeConfig
from tinychat.speedrun import CONFIG_DIR, Speedrun, SpeedrunConfig, with_preset_defaults
from tinychat.tokenizer.train import TokenizerTrainConfig
from tinychat.train.copy_drills import CopyDrillsConfig
from tinychat.train.dpo import DPOConfig
from tinychat.train.grpo import GRPOConfig
from tinychat.train.pretrain import PretrainConfig
from tinychat.train.sft import SFTConfig
from tinychat.world.drills import DrillsConfig

SPEEDRUN_PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.toml") if "[speedrun]" in p.read_text())
STAGES = [
    (TokenizerTrainConfig, "tokenizer_train"),
    (PrepareConfig, "data_prepare"),
    (TokenizeConfig, "data_tokenize"),
    (CopyDrillsConfig, "copy-drills"),
    (PretrainConfig, "pretrain"),
    (SFTConfig, "sft"),
    (DPOConfig, "dpo"),
    (GRPOConfig, "grpo"),
    (DrillsConfig, "world_drills"),  # the speedrun's drill stage: its rows, then sft and pretrain under other names
    (SFTConfig, "drill"),
    (PretrainConfig, "anneal"),
]


def test_the_presets_are_found():
    assert {"micro", "cpu-tiny", "gpu-small"} <= set(SPEEDRUN_PRESETS)


@pytest.mark.parametrize("preset", SPEEDRUN_PRESETS)
def test_every_stage_config_builds(preset: str, tmp_path):
    run = Speedrun(with_preset_defaults(SpeedrunConfig(preset=preset, runs_dir=str(tmp_path), run="r")))
    for cls, section in STAGES:
        cfg = run.stage_config(cls, section, [])
        assert isinstance(cfg, cls), section
    pre = run.stage_config(PretrainConfig, "pretrain", [])
    assert pre.train.max_time > 0 or pre.train.max_steps > 0  # a pretraining that ends


def test_gpu_small_is_the_small_model_on_cuda(tmp_path):
    run = Speedrun(with_preset_defaults(SpeedrunConfig(preset="gpu-small", runs_dir=str(tmp_path), run="r")))
    pre = run.stage_config(PretrainConfig, "pretrain", [])
    assert (pre.model.preset, pre.train.device, pre.train.precision) == ("small", "cuda", "bf16")
    assert run.cfg.world_size == "medium"


@pytest.mark.parametrize("k", [1, 2, 4])
def test_step_presets_are_cpu_tiny_with_fixed_steps(k: int):
    """cpu-tiny-Nx is cpu-tiny with s4's optimiser steps x N in place of its time budgets, and nothing else:
    a recipe change made to cpu-tiny and not to them would make their comparisons meaningless."""
    from tinychat.config import load_toml

    base, steps = load_toml(CONFIG_DIR / "cpu-tiny.toml"), load_toml(CONFIG_DIR / f"cpu-tiny-{k}x.toml")
    s4 = {"pretrain": 693, "sft": 99, "dpo": 119, "grpo": 45}  # s4's steps, pretraining's of 16 x 256 tokens
    for stage, n in s4.items():
        assert base[stage]["train"].pop("max_time") > 0
        batch = base[stage]["train"].get("batch_size", base["train"]["batch_size"])
        per_s4_step = 16 // batch if stage == "pretrain" else 1  # s4's tokens, in the preset's steps
        assert steps[stage]["train"].pop("max_steps") == n * k * per_s4_step
        assert steps[stage]["train"].pop("max_time") == 0
    assert base["speedrun"].pop("later_work") > 0  # pretraining's time = what the budget leaves: steps fix it
    assert base["pretrain"]["train"].pop("reserve_floor") > 0  # a floor under the time plan's reserve: steps fix it
    assert base["speedrun"].pop("end_margin") >= 0
    assert steps["speedrun"].pop("budget_minutes") == 15.0 * k
    assert base["speedrun"].pop("target_steps") > 0  # fitting the shape to the time budget: steps fix both
    rungs = [s.split("@")[0] for s in base["speedrun"].pop("shapes")]  # a shape may carry its own target after '@'
    assert f"n_layer={base['model']['n_layer']}" in rungs  # [model] itself is a rung
    base["speedrun"].pop("budget_minutes")
    assert steps == base
