"""Resumable checkpoints: an HF model directory plus the optimiser, RNG and loop state beside it.

A checkpoint is `checkpoints/STAGE/step_000123/`: config.json + model.safetensors (fp32, opens in
transformers), the tokenizer files, optimizer.safetensors (AdamW moments by parameter name) with
optimizer.json (param groups), and trainer_state.json (step, tokens, objective state, RNG). It is written
into a temporary directory and renamed into place, so a kill at any moment leaves either the old set
of checkpoints or the new one, never a half-written directory. Nothing here is pickled.

Weights and optimiser state go through torch.distributed.checkpoint's state-dict API, which gathers
full tensors from DDP and FSDP2 alike, so a run can resume with another world size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from tinychat.errors import UserError
from tinychat.model.hf import copy_tokenizer, save_pretrained
from tinychat.train.twins import fold_state, split_state

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dirs(stage_dir: Path) -> list[Path]:
    if not stage_dir.is_dir():
        return []
    return sorted((p for p in stage_dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    dirs = [p for p in step_dirs(stage_dir) if (p / "trainer_state.json").is_file()]
    return dirs[-1] if dirs else None


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimiser state dicts, keyed by parameter name; collective under FSDP."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=opts), {}
    return get_state_dict(model, optimizer, options=opts)


def gather_stages(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, pipe: Any) -> tuple[dict, dict]:
    """gather_state under pipeline parallelism: each stage gathers its own part whole (on every rank of the
    stage: torch's CPU offload would keep it on global rank 0 only, which holds stage 0), then the first stage
    merges the parts by name (names are the whole model's, see train/pipeline.py). Empty dicts elsewhere."""
    opts = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model, options=opts), {}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    cpu = {k: v.detach().cpu() for k, v in model_sd.items()}
    if optim_sd:
        state = {
            k: {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
            for k, v in optim_sd["state"].items()
        }
        optim_sd = {"state": state, "param_groups": optim_sd["param_groups"]}
    parts = pipe.gather_to_first((cpu, optim_sd))
    if parts is None:
        return {}, {}
    merged_model = {k: v for m, _ in parts for k, v in m.items()}
    if not optim_sd:
        return merged_model, {}
    groups = [
        dict(g, params=[p for _, o in parts for p in o["param_groups"][i]["params"]])
        for i, g in enumerate(optim_sd["param_groups"])
    ]
    return merged_model, {"state": {k: v for _, o in parts for k, v in o["state"].items()}, "param_groups": groups}


def save_checkpoint(
    stage_dir: Path,
    step: int,
    model: torch.nn.Module,  # the unwrapped tinychat Model (FSDP2 shards it in place)
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    tokenizer_dir: str | Path | None,
    keep: int,
    is_main: bool,
    pipe: Any = None,  # train/pipeline.py's Pipeline when the model is one pipeline stage
) -> Path:
    # every rank takes part in the gather
    model_sd, optim_sd = gather_stages(model, optimizer, pipe) if pipe else gather_state(model, optimizer)
    model_sd = fold_state(model, model_sd)  # a plain model directory; the optimiser keeps W's and S's names
    final = stage_dir / f"step_{step:06d}"
    if not is_main:
        return final
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.tmp-", dir=stage_dir))
    try:
        save_pretrained(model, tmp / "model", dtype=torch.float32, state_dict=model_sd)
        for f in (tmp / "model").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "model").rmdir()
        copy_tokenizer(tokenizer_dir, tmp)
        if optim_sd:
            tensors, groups = flatten_optimizer_state(optim_sd)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(groups, indent=1))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in step_dirs(stage_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def flatten_optimizer_state(optim_sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, st in optim_sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{fqn}::{k}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim_sd["param_groups"]]
    return tensors, groups


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        fqn, _, k = key.rpartition("::")
        state.setdefault(fqn, {})[k] = t
    param_groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": param_groups}


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_tensor_names(path: Path, weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """A UserError unless the checkpoint holds exactly the model's tensors: a resume never trains on with fresh
    weights in place of missing ones (the loader itself fills them in silently) or drops unknown ones."""
    expected = set(get_model_state_dict(model))  # the model's own names (no DDP/compile/checkpointing wrappers)
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        parts = [f"lacks {len(missing)} of the model's tensors ({_names(missing)})"] if missing else []
        parts += [f"holds {len(unexpected)} the model does not have ({_names(unexpected)})"] if unexpected else []
        raise UserError(
            f"checkpoint {path} does not match the model being resumed: it {' and '.join(parts)}; resume with the "
            "model settings (and --lora) it was written with, or start fresh without --resume."
        )


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, stage: bool = False
) -> dict[str, Any]:
    """Restore weights, optimiser and RNG from `path` into an already built (and wrapped) model; return
    the trainer state. Every rank reads the files (they are small next to training, and shared storage
    is what torchrun setups have). `stage`: the model is one pipeline stage and takes only its own tensors.
    The weights are whole in the file and are split here by the model's own sharding (DTensor placements),
    so a run resumes under another mesh or world size."""
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} cannot be read: {e}.") from None
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        unwrapped = getattr(model, "module", model)
        if unwrapped.cfg.tie_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights = split_state(model, weights)
    if stage:
        weights = {k: v for k, v in weights.items() if k in set(get_model_state_dict(model))}
    check_tensor_names(path, weights, model)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    if optimizer is not None and (path / "optimizer.safetensors").is_file():
        osd = unflatten_optimizer_state(
            load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
        )
        if stage:
            osd["state"] = {k: v for k, v in osd["state"].items() if k in weights}
            osd["param_groups"] = [
                dict(g, params=[p for p in g["params"] if p in weights]) for g in osd["param_groups"]
            ]
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=osd, options=opts)
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, weights, options=opts)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
