"""Parameter-efficient fine-tuning: one `--peft.method` choice for every training command, PEFT's file formats.

Methods (each in its own module, each applied from outside the Transformer by wrapping modules):
- lora, dora (lora.py): low-rank updates of the projections (DoRA adds a trained magnitude per row);
- qlora (lora.py over model/compress/quant.py): the base's block projections quantized to int4/int8 in
  memory (embeddings and head stay float, as in QLoRA), LoRA on top;
- ia3 (ia3.py): learned per-channel scales of k, v and the feed-forward input;
- prompt, ptuning, prefix, ptuning_v2 (prompt.py): virtual tokens at the input or at every layer;
- houlsby, parallel, mam (adapters.py): bottleneck adapters (MAM adds a prefix), in tinychat's own format;
- unipelt (unipelt.py): gated LoRA on q/v + gated prefix + gated serial adapter, in tinychat's own format.
LoRA/DoRA/IA3 merge into the weights (the stage's model is the merged one, the adapter sits beside it in
adapter/); the other methods cannot merge, so their stage directory *is* the adapter (adapter_config.json +
adapter_model.safetensors naming the base), run unmerged by generate/chat/eval/serve.

`--peft.method auto` (the default) keeps the older flags working: LoRA when `--lora.rank` > 0, else every
weight trains. LoRA's and DoRA's settings stay under `--lora.*`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.peft import adapters, ia3, lora, prompt, unipelt
from tinychat.model.peft.common import ADAPTER_CONFIG, adapter_base, is_adapter_dir, read_adapter_config, switched_off

if TYPE_CHECKING:
    from tinychat.model.transformer import Model

METHODS = (
    "none", "lora", "dora", "qlora", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2", "houlsby", "parallel", "mam",
    "unipelt",
)  # fmt: skip
VIRTUAL = ("prompt", "ptuning", "prefix", "ptuning_v2")
BOTTLENECK = ("houlsby", "parallel", "mam")
PREFIXED = (*VIRTUAL, "mam", "unipelt")  # methods whose virtual tokens take the first positions
UNMERGED = (*VIRTUAL, *BOTTLENECK, "unipelt")  # run unmerged; a stage trained with one is an adapter directory

__all__ = ["METHODS", "PeftConfig", "apply_peft", "is_adapter_dir", "load_adapter", "save_result"]


@dataclass
class PeftConfig:
    method: Literal[
        "auto",
        "none",
        "lora",
        "dora",
        "qlora",
        "ia3",
        "prompt",
        "ptuning",
        "prefix",
        "ptuning_v2",
        "houlsby",
        "parallel",
        "mam",
        "unipelt",
    ] = field(
        "auto",
        help="auto (lora if --lora.rank > 0, else none), none (every weight trains), lora, dora, qlora (LoRA over "
        "an int4/int8 base), ia3, prompt "
        "(prompt tuning), ptuning (P-tuning v1), prefix (prefix tuning), ptuning_v2 (deep prompts, no MLP), "
        "houlsby (serial adapters), parallel (parallel adapters), mam (prefix + parallel FFN adapter), unipelt (gated "
        "lora on q/v + gated prefix + gated FFN adapter)",
    )
    virtual_tokens: int = field(20, help="prompt/ptuning/prefix/ptuning_v2/mam/unipelt: number of virtual tokens")
    init_text: str = field(
        "", help="prompt / ptuning_v2: start from this text's token embeddings / keys and values (else random tokens')"
    )
    encoder: Literal["mlp", "lstm"] = field("mlp", help="ptuning: the prompt encoder")
    encoder_hidden: int = field(0, help="ptuning/prefix: hidden width of the encoder or MLP (0 = token width)")
    targets: list[str] = field(["k", "v", "down"], help="ia3: projections to rescale (q,k,v,o,gate,up,down)")
    bits: int = field(4, help="qlora: the frozen base's integer width, 4 or 8")
    group_size: int = field(64, help="qlora: int4 scale group (32, 64, 128 or 256)")
    adapter_dim: int = field(16, help="houlsby/parallel/mam/unipelt: bottleneck width of each adapter")
    adapter_scale: float = field(0.0, help="parallel/mam: output scale s (0 = 1 for parallel, 4 for mam)")

    def resolve(self, lcfg: lora.LoraConfig) -> str:
        """The method to apply (auto resolved); sets --lora.rank 8 / use_dora for lora/dora; UserError on a clash."""
        m = self.method if self.method != "auto" else ("lora" if lcfg.rank > 0 else "none")
        if m in ("lora", "dora", "qlora"):
            lcfg.rank = lcfg.rank or 8
            lcfg.use_dora = lcfg.use_dora or m == "dora"
            lcfg.leaf_names()
        if m == "qlora":
            from tinychat.model.compress.quant import check_bits

            check_bits(self.bits, self.group_size)
            if lcfg.modules_to_save:
                raise UserError("--lora.modules_to_save cannot train whole modules of a quantized base (qlora).")
        if m == "unipelt":
            unipelt.lora_config(lcfg)
        elif m not in ("lora", "dora", "qlora") and (lcfg.rank > 0 or lcfg.modules_to_save):
            raise UserError(f"--lora.* is for --peft.method lora or dora, not {m}; drop one of the two.")
        if m in PREFIXED and self.virtual_tokens <= 0:
            raise UserError(f"--peft.virtual_tokens must be > 0 for --peft.method {m}.")
        if m == "ia3":
            lora.target_leaves(self.targets, "--peft.targets")
        if m in (*BOTTLENECK, "unipelt") and self.adapter_dim <= 0:
            raise UserError(f"--peft.adapter_dim must be > 0 for --peft.method {m}.")
        return m

    def spec(self, method: str) -> prompt.PromptSpec:
        kind = "prefix" if method in ("prefix", "ptuning_v2", "mam") else method
        return prompt.PromptSpec(
            kind=kind,
            n=self.virtual_tokens,
            encoder=self.encoder,
            encoder_hidden=self.encoder_hidden,
            projection=method in ("prefix", "mam"),
            init_text=self.init_text if method in ("prompt", "ptuning_v2") else "",
        )


def apply_peft(
    model: nn.Module,
    pcfg: PeftConfig,
    lcfg: lora.LoraConfig,
    heads: tuple[str, ...] = (),
    init_ids: list[int] | None = None,
) -> str:
    """Apply the chosen method to `model` (frozen base, trainable adapter and `heads`); returns a one-line
    summary ("" when every weight trains). `init_ids`: prompt tuning's / P-tuning v2's init text, tokenised by
    the caller."""
    m = pcfg.resolve(lcfg)
    if m == "none":
        return ""
    if prompt.has_virtual_tokens(model):
        raise UserError(f"the starting model carries a prompt/prefix adapter; --peft.method {m} cannot train on it.")
    if m in ("lora", "dora", "qlora"):
        if m == "qlora":
            from tinychat.model.compress.quant import quantize_blocks

            quantize_blocks(model, pcfg.bits, pcfg.group_size)
        n = lora.apply_lora(model, lcfg)
        what = f"{m} rank {lcfg.rank} on {n} projections" + (f" of an int{pcfg.bits} base" * (m == "qlora"))
    elif m == "ia3":
        n = ia3.apply_ia3(model, pcfg.targets)
        what = f"ia3 on {n} projections"
    elif m in VIRTUAL:
        prompt.attach_virtual_tokens(model, pcfg.spec(m), init_ids)
        what = f"{m}, {pcfg.virtual_tokens} virtual tokens"
    elif m == "unipelt":
        what = unipelt.apply_unipelt(model, pcfg.virtual_tokens, pcfg.encoder_hidden, lcfg, pcfg.adapter_dim)
    else:
        if m == "mam":
            prompt.attach_virtual_tokens(model, pcfg.spec(m))
        scale = pcfg.adapter_scale or (4.0 if m == "mam" else 1.0)
        n = adapters.apply_adapters(model, m, pcfg.adapter_dim, scale, freeze=m != "mam")
        what = f"{m}, {n} adapters of width {pcfg.adapter_dim}" + (
            f" + {pcfg.virtual_tokens} prefix tokens" * (m == "mam")
        )
    for name in heads:
        getattr(model, name).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{what}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%)"


def has_adapters(model: nn.Module) -> bool:
    return lora.has_lora(model) or ia3.has_ia3(model) or prompt.has_virtual_tokens(model) or has_bottlenecks(model)


def has_bottlenecks(model: nn.Module) -> bool:
    return bool(adapters.bottlenecks(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (every adapter off): the frozen reference of DPO/PPO/GRPO at no memory cost."""
    classes = (lora.LoRALinear, ia3.IA3Linear, prompt.VirtualTokens, adapters.Bottleneck)
    with switched_off(model, classes):
        yield


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA/IA3 into plain nn.Linear weights in place; a UserError for virtual tokens (no merge)."""
    if prompt.has_virtual_tokens(model) or has_bottlenecks(model):
        raise UserError("prompt/prefix and bottleneck adapters cannot be merged into the weights; run them unmerged.")
    return ia3.merge_ia3(lora.merge_lora(model))


def merge_state(state: dict[str, torch.Tensor], lora_scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA/DoRA/IA3 model's state dict as plain HF weights."""
    return ia3.merge_state(lora.merge_state(state, lora_scaling))


def save_result(
    path: Path,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    lcfg: lora.LoraConfig,
    init: Path,
    task_type: str = "CAUSAL_LM",
    modules: tuple[str, ...] = (),
) -> dict[str, torch.Tensor] | None:
    """Write a trained stage's adapter and return the state to save as its model directory.

    LoRA/DoRA/IA3: the PEFT adapter goes to path/adapter and the merged weights are returned; virtual tokens,
    bottleneck adapters and QLoRA (a quantized base has no float weights to merge into): path itself becomes
    the adapter directory and None is returned (there is no merged model to write);
    no adapter: `state` is returned unchanged.
    """
    base = init if (init / "config.json").is_file() else ""  # an adapter-only init has no base dir
    if unipelt.is_unipelt(model):
        if modules:
            raise UserError(f"UniPELT adapters cannot carry the {', '.join(modules)} head; use lora, dora or ia3.")
        unipelt.save_unipelt(path, model, state, lcfg, base, task_type)
        return None
    if has_bottlenecks(model):
        if modules:
            raise UserError(f"bottleneck adapters cannot carry the {', '.join(modules)} head; use lora, dora or ia3.")
        method = next(k for k, v in adapters.PLACEMENTS.items() if v == adapter_placement(model))
        adapters.save_adapters(path, model, state, method, base, task_type)
        return None
    if lora.has_quantized_base(model):  # QLoRA: no float weights to merge into
        lora.save_adapter(path, state, lcfg, base, task_type, modules)
        return None
    if prompt.has_virtual_tokens(model):
        if modules:
            raise UserError(
                f"prompt/prefix adapters cannot carry the {', '.join(modules)} head; use lora, dora or ia3."
            )
        prompt.save_virtual_tokens(path, model, state, base, task_type)
        return None
    if lora.has_lora(model):
        lora.save_adapter(path / "adapter", state, lcfg, base, task_type, modules)
    elif ia3.has_ia3(model):
        if modules:
            raise UserError(f"ia3 adapters here cannot carry the {', '.join(modules)} head; use lora or dora.")
        ia3.save_ia3(path / "adapter", state, base, task_type)
    else:
        return state
    return merge_state(state, lcfg.scaling if lcfg.rank else 1.0)


def adapter_placement(model: nn.Module) -> dict[str, str]:
    """{sublayer: serial|parallel} of the bottleneck adapters in the model's first layer."""
    layer = model.model.layers[0]
    out = {}
    for sub in ("self_attn", "mlp"):
        a = getattr(getattr(layer, sub), "adapter", None)
        if a is not None:
            out[sub] = "serial" if a.serial else "parallel"
    return out


def load_with_base(path: Path, dtype: torch.dtype | None = None, device: str | None = None) -> Model:
    """An adapter directory as a model: the base it names, with the adapter merged in (LoRA, DoRA, IA3) or
    attached unmerged (prompt/prefix methods). Model.from_pretrained lands here for adapter directories."""
    from tinychat.model.hf import load_pretrained

    base = adapter_base(path)
    if is_adapter_dir(base):
        raise UserError(f"{path}: its base {base} is itself an adapter directory; merge that one first.")
    model = load_pretrained(base, dtype=dtype, device=device)
    load_adapter(model, path)
    unmerged = prompt.has_virtual_tokens(model) or has_bottlenecks(model) or lora.has_quantized_base(model)
    return model if unmerged else merge_adapters(model)


def load_adapter(model: nn.Module, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Apply the adapter at `path` (any method, ours or PEFT's) to `model`; returns (adapter_config.json,
    tensors the model has no parameter for, such as a reward head the caller places)."""
    d = read_adapter_config(path)
    t = d["peft_type"]
    if t == "LORA":
        cfg, unused = lora.load_adapter(model, path)
        d["modules_to_save"] = cfg.modules_to_save
        return d, unused
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{Path(path) / ADAPTER_CONFIG}: {t} adapters are read for CAUSAL_LM, not {d['task_type']}.")
    if t == "IA3":
        ia3.load_ia3(model, path, d)
    elif t == unipelt.PEFT_TYPE:
        unipelt.load_unipelt(model, path, d)
    elif t in adapters.TYPES.values():
        adapters.load_adapters(model, path, d)
    else:
        prompt.load_virtual_tokens(model, path, d)
    return d, {}
