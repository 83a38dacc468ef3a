"""The one training loop in-process, on a one-layer model and random tokens: precision, resume, MFU, metrics."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinychat.errors import UserError
from tinychat.model.config import preset
from tinychat.model.transformer import Model
from tinychat.train import mfu
from tinychat.train.config import TrainConfig
from tinychat.train.loop import Objective, time_budget, train
from tinychat.train.metrics import read_metrics
from tinychat.train.pretrain import lm_loss

VOCAB = 64


def tiny_model() -> Model:
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, n_kv_head=1, head_dim=16, d_ff=64)
    return Model(cfg)


class RandomTokens(Objective):
    """Next-token loss on random sequences, fixed per step; the loss of the steps in `blow_up` is x1e30."""

    name = "random"

    def __init__(self, blow_up: tuple[int, ...] = ()) -> None:
        self.blow_up, self.step = blow_up, 0

    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Any]:
        self.step = step
        x = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(step))
        return [(x[:, :-1], x[:, 1:])]

    def count(self, batch: Any) -> int:
        return batch[1].numel()

    def tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = lm_loss(model, *batch)
        return (loss * 1e30 if self.step in self.blow_up else loss), {}


def config(**overrides: Any) -> TrainConfig:
    """A pinned MFU peak: no matmul probe (fp16 matmuls on a CPU are emulated and slow)."""
    base = dict(device="cpu", precision="fp32", max_steps=4, lr=1e-2, warmup_steps=0, eval_every=0)
    return TrainConfig(**{**base, "checkpoint_every": 0, "tensorboard": False, "peak_flops": 1.0, **overrides})


def train_records(run: Path) -> list[dict[str, Any]]:
    return read_metrics(run, "random", "train")


def test_fp16_scales_the_loss_skips_overflowing_steps_and_clips_unscaled(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(RandomTokens(blow_up=(0,)), model, config(precision="fp16", max_steps=1), tmp_path / "a", "random")
    assert result.steps == 1  # an overflow is no divergence: the step is skipped and the scale halved
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (rec,) = train_records(tmp_path / "a")
    assert rec["skipped"] == 1 and rec["loss_scale"] == 2.0**16 and rec["grad_norm"] is None

    train(RandomTokens(), tiny_model(), config(precision="fp16"), tmp_path / "b", "random")
    train(RandomTokens(), tiny_model(), config(), tmp_path / "c", "random")
    fp16, fp32 = train_records(tmp_path / "b"), train_records(tmp_path / "c")
    assert [r["skipped"] for r in fp16] == [0, 0, 0, 0] and "loss_scale" not in fp32[0]
    for a, b in zip(fp16, fp32):  # the clipped and reported norm is the true one, not 65536 times it
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.05)
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05)
    state = json.loads((tmp_path / "b" / "checkpoints" / "random" / "step_000004" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0**16


def test_resume_refuses_a_checkpoint_missing_or_adding_tensors(tmp_path):
    run, stage_dir = tmp_path / "r", tmp_path / "r" / "checkpoints" / "random"
    train(RandomTokens(), tiny_model(), config(max_steps=2), run, "random")
    # a legitimate resume continues (the tied head is not in the file: it comes back from the embedding)
    assert "lm_head.weight" not in load_file(stage_dir / "step_000002" / "model.safetensors")
    assert train(RandomTokens(), tiny_model(), config(max_steps=3), run, "random", resume=True).steps == 3
    weights = load_file(stage_dir / "step_000003" / "model.safetensors")
    del weights["model.norm.weight"]
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, stage_dir / "step_000003" / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks 1 of the model's tensors \(model\.norm\.weight\) and holds 1 the"):
        train(RandomTokens(), tiny_model(), config(max_steps=4), run, "random", resume=True)
    with pytest.raises(UserError, match=r"does not have \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        train(RandomTokens(), tiny_model(), config(max_steps=4), run, "random", resume=True)


def test_peak_is_the_best_of_five_probes_and_of_earlier_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYCHAT_CACHE", str(tmp_path))
    readings = iter([4e11, 9e11, 7e11, 8e11, 5e11] + [6e11] * 5)
    monkeypatch.setattr(mfu, "_burst", lambda a, b, seconds: next(readings))
    cpu = torch.device("cpu")
    first = mfu.peak_flops(cpu, torch.float32)
    assert first.flops == 9e11 and first.record() == {
        "peak_flops": 9e11,
        "source": "probe",
        "probes": [4e11, 9e11, 7e11, 8e11, 5e11],
        "probe_min": 4e11,
        "probe_median": 7e11,
        "probe_max": 9e11,
        "cached_best": 0.0,
    }
    second = mfu.peak_flops(cpu, torch.float32)  # probed while something else loads the machine
    assert second.flops == 9e11 and second.cached == 9e11 and second.record()["probe_max"] == 6e11
    assert mfu.measure_peak_flops(cpu, torch.float32) == 9e11
    assert "min 0.4 / median 0.7 / max 0.9" in first.describe()
    pinned = mfu.peak_flops(cpu, torch.float32, pinned_tflops=2.5)
    assert pinned.flops == 2.5e12 and pinned.record() == {"peak_flops": 2.5e12, "source": "pinned"}
    with pytest.raises(UserError, match="train.peak_flops must be a positive number of TFLOP/s"):
        mfu.peak_flops(cpu, torch.float32, pinned_tflops=-1.0)


def test_the_probe_is_short():
    t0 = time.process_time()
    probes = mfu.probe_flops(torch.device("cpu"), torch.float32)
    assert len(probes) == mfu.PROBES and min(probes) > 0
    # CPU seconds per thread: bounded by the wall time of the bursts, however loaded the machine is
    assert (time.process_time() - t0) / torch.get_num_threads() < 1.5


def test_a_run_records_its_peak_and_a_pinned_peak_sets_the_mfu(tmp_path, monkeypatch):
    train(RandomTokens(), tiny_model(), config(max_steps=2, peak_flops=0.5), tmp_path / "p", "random")
    (peak,) = read_metrics(tmp_path / "p", "random", "peak")
    assert peak["source"] == "pinned" and peak["peak_flops"] == 5e11
    flops_per_token = tiny_model().flops_per_token(config().seq_len)
    for rec in train_records(tmp_path / "p"):
        assert rec["mfu"] == pytest.approx(flops_per_token * rec["tok_per_s"] / 5e11)
    monkeypatch.setenv("TINYCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mfu, "_burst", lambda a, b, seconds: 1e9)
    train(RandomTokens(), tiny_model(), config(max_steps=1, peak_flops=0.0), tmp_path / "q", "random")
    (peak,) = read_metrics(tmp_path / "q", "random", "peak")
    assert peak["source"] == "probe" and len(peak["probes"]) == 5 and peak["probe_median"] == 1e9


def test_training_writes_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(RandomTokens(), tiny_model(), config(max_steps=2, tensorboard=True), tmp_path, "random")
    events = EventAccumulator(str(tmp_path / "tensorboard" / "random")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert {"train/grad_norm", "train/mfu", "peak/peak_flops"} <= set(events.Tags()["scalars"])


def test_keep_sparsity_keeps_a_pruned_models_zeros_while_the_rest_trains(tmp_path):
    """Without the mask AdamW regrows every pruned weight on its first step; with it the zero pattern is
    exactly the pruned one after training, while the surviving weights did move."""
    from tinychat.model.compress.prune import prune_magnitude

    def pruned() -> Model:
        return prune_magnitude(tiny_model(), 0.5)

    def zeros(m: Model) -> torch.Tensor:
        return m.model.layers[0].mlp.down_proj.weight == 0

    before = pruned()
    kept = pruned()
    train(RandomTokens(), kept, config(keep_sparsity=True), tmp_path / "a", "random")
    assert torch.equal(zeros(kept), zeros(before)) and float(zeros(kept).float().mean()) > 0.45
    w0, w1 = before.model.layers[0].mlp.down_proj.weight, kept.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(w0, w1)  # the surviving weights trained
    regrown = pruned()
    train(RandomTokens(), regrown, config(), tmp_path / "b", "random")
    assert float(zeros(regrown).float().mean()) < 0.05  # the control: a plain fine-tune fills the zeros
    with pytest.raises(UserError, match="keep_sparsity needs"):
        train(RandomTokens(), tiny_model(), config(keep_sparsity=True), tmp_path / "c", "random")


def test_the_time_budget_keeps_the_reserve_at_the_measured_rate():
    cfg = TrainConfig(max_time=10.0, reserve_tokens=1_000_000)
    assert time_budget(cfg, 19, 50_000, 20.0) == 600.0  # too early to trust the rate
    assert time_budget(cfg, 100, 400_000, 100.0) == pytest.approx(350.0)  # 4k tokens/s: 250 s reserved
    assert time_budget(cfg, 100, 200_000, 100.0) == pytest.approx(300.0)  # twice as slow: capped at half
    assert time_budget(TrainConfig(max_time=10.0), 100, 200_000, 100.0) == 600.0
    capped = TrainConfig(max_time=10.0, reserve_tokens=1_000_000, reserve_cap=0.25)
    assert time_budget(capped, 100, 400_000, 100.0) == pytest.approx(450.0)  # 250 s wanted, 150 s allowed
    assert time_budget(capped, 100, 4_000_000, 100.0) == pytest.approx(575.0)  # under the cap: 25 s


def test_the_reserve_rate_is_measured_from_step_20_without_the_first_steps_compile():
    """The loop passes (elapsed, tokens) at step 20: a 40 s compile in the first step would otherwise price the
    reserve at ~6x the real rate and take the cap."""
    cfg = TrainConfig(max_time=10.0, reserve_tokens=1_000_000, reserve_cap=0.9)
    # 60 s at step 100, 40 of them compiling before step 20: 20 s for 320k tokens after it, 16k tokens/s
    assert time_budget(cfg, 100, 400_000, 60.0, origin=(40.0, 80_000)) == pytest.approx(600.0 - 62.5)
    assert time_budget(cfg, 100, 400_000, 60.0) == pytest.approx(600.0 - 150.0)  # the whole span's rate: 2.4x more
    assert time_budget(cfg, 20, 80_000, 40.0, origin=(40.0, 80_000)) == 600.0  # nothing measured yet


def test_the_reserve_never_stops_training_before_its_floor():
    """reserve_floor steps are kept at the measured rate, whatever the reserve takes; max_time still bounds them."""
    cfg = TrainConfig(max_time=10.0, reserve_tokens=100_000_000, reserve_cap=0.9, reserve_floor=300)
    # 4k tokens a step, 60 s to step 100 of which 40 compiled before step 20: 0.25 s a step after it
    origin = (40.0, 80_000)
    assert time_budget(cfg, 100, 400_000, 60.0, origin) == pytest.approx(40.0 + 280 * 0.25)  # the floor: 110 s
    assert time_budget(replace(cfg, reserve_floor=0), 100, 400_000, 60.0, origin) == pytest.approx(600.0 - 540.0)
    assert time_budget(replace(cfg, reserve_floor=50), 100, 400_000, 60.0, origin) == pytest.approx(60.0)
    assert time_budget(replace(cfg, reserve_floor=10_000), 100, 400_000, 60.0, origin) == 600.0  # at most max_time
    assert time_budget(replace(cfg, reserve_tokens=0), 100, 400_000, 60.0, origin) == 600.0  # no reserve, no floor


def test_the_loop_trains_to_the_reserve_floor(tmp_path: Path):
    """A reserve larger than the whole budget would stop training at step 20; the floor carries it on."""
    huge = {"max_steps": 0, "max_time": 5.0, "reserve_tokens": 10**12, "reserve_cap": 1.0, "eval_every": 0}
    floored = train(RandomTokens(), tiny_model(), config(reserve_floor=30, **huge), tmp_path / "f", "random")
    assert floored.steps == 30
    with pytest.raises(UserError, match="reserve_floor"):
        train(RandomTokens(), tiny_model(), config(reserve_floor=-1), tmp_path / "n", "random")


def test_the_loop_keeps_the_rate_origin_in_its_checkpoint(tmp_path: Path):
    """A resumed stage measures its reserve's rate from the same step-20 origin."""
    run = tmp_path / "o"
    train(RandomTokens(), tiny_model(), config(max_steps=24, checkpoint_every=24), run, "random")
    ckpt = sorted((run / "checkpoints" / "random").glob("step_*"))[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    elapsed, tokens = state["rate_origin"]
    assert 0 < elapsed < state["elapsed"] and 0 < tokens < state["tokens"]


def test_a_reserve_cap_outside_zero_to_one_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match="reserve_cap"):
        train(RandomTokens(), tiny_model(), config(reserve_cap=1.5), tmp_path / "r", "random")


def test_compiled_training_takes_the_eager_steps(tmp_path):
    """--train.compile trains through inductor's kernels (the speedrun's pretraining and anneal, round 28): the
    same losses as eager training to float rounding, weights to 1% of what the steps moved them, and a
    checkpoint that resumes."""
    eager, compiled = tiny_model(), tiny_model()
    train(RandomTokens(), eager, config(max_steps=3), tmp_path / "e", "random")
    result = train(RandomTokens(), compiled, config(max_steps=3, compile=True), tmp_path / "c", "random")
    assert result.steps == 3
    for a, b in zip(train_records(tmp_path / "e"), train_records(tmp_path / "c")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-4, msg=name)  # 3 Adam steps of lr 1e-2 move one 3e-2
    step_dir = result.model_dir / "step_000003"
    assert not any("_orig_mod" in k for k in load_file(step_dir / "model.safetensors"))
    resumed = config(max_steps=4, compile=True)
    assert train(RandomTokens(), tiny_model(), resumed, tmp_path / "c", "random", resume=True).steps == 4


def test_compile_without_a_cpp_compiler_trains_eagerly_and_says_so(tmp_path, monkeypatch, capsys):
    """A laptop without g++ gets the eager run (bit for bit) and a one-line note, not an inductor failure."""
    from torch._inductor import cpp_builder, exc

    def none_found() -> str:
        raise exc.InvalidCxxCompiler  # what inductor's search raises when no compiler answers `--version`

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    eager, fallback = tiny_model(), tiny_model()
    train(RandomTokens(), eager, config(max_steps=2), tmp_path / "e", "random")
    train(RandomTokens(), fallback, config(max_steps=2, compile=True), tmp_path / "f", "random")
    assert "note: --train.compile is off for this run: no C++ compiler" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fallback.state_dict().values()))


def test_compile_whose_kernels_do_not_build_trains_eagerly_and_says_why(tmp_path, monkeypatch, capsys):
    """A compiler that is found but cannot build inductor's kernels (Apple's clang without OpenMP headers): the
    probe kernel fails, so the run trains eagerly with the reason, and the model is never compiled."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            raise RuntimeError("fatal error: 'omp.h' file not found")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    eager, fallback = tiny_model(), tiny_model()
    train(RandomTokens(), eager, config(max_steps=2), tmp_path / "e", "random")
    train(RandomTokens(), fallback, config(max_steps=2, compile=True), tmp_path / "f", "random")
    out = capsys.readouterr().out
    assert "note: --train.compile is off for this run: inductor could not build a CPU kernel here" in out
    assert "RuntimeError: fatal error: 'omp.h' file not found" in out
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fallback.state_dict().values()))
