"""`tinychat model init` and `tinychat model info`: create a model directory, or describe one."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field

from tinychat.config import field
from tinychat.model.config import ModelConfig


@dataclass
class ModelInitConfig:
    out: str = field("", help="directory to write (HF layout)")
    tokenizer: str = field("", help="tokenizer directory: sets vocab_size and is copied beside the weights")
    seed: int = field(0)
    model: ModelConfig = dc_field(default_factory=ModelConfig)


@dataclass
class ModelInfoConfig:
    model: str = field("", positional=True, help="model directory or hub id")


def run_init(cfg: ModelInitConfig) -> int:
    import torch

    from tinychat.errors import UserError
    from tinychat.model.config import resolve
    from tinychat.model.transformer import Model

    if not cfg.out:
        raise UserError("--out DIR is required.")
    explicit: dict = {}
    tok = None
    if cfg.tokenizer:
        from tinychat.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(cfg.tokenizer)
        explicit.update(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    mcfg = resolve(cfg.model, **explicit)  # fields left at their defaults come from the preset
    torch.manual_seed(cfg.seed)
    model = Model(mcfg)
    model.save_pretrained(cfg.out)
    if tok is not None:
        tok.save_pretrained(cfg.out)
    print(f"wrote {cfg.out}: {model.num_params() / 1e6:.2f}M parameters ({mcfg.arch}, preset {mcfg.preset})")
    return 0


def run_info(cfg: ModelInfoConfig) -> int:
    import torch

    from tinychat.errors import UserError
    from tinychat.model.hf import read_config
    from tinychat.model.transformer import Model

    if not cfg.model:
        raise UserError("give a model directory: tinychat model info DIR.")
    mcfg = read_config(cfg.model)
    with torch.device("meta"):
        model = Model(mcfg)
    print(
        f"{cfg.model}: {mcfg.arch}, {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params(exclude_embeddings=True) / 1e6:.2f}M without embeddings)"
    )
    print(
        f"  d_model {mcfg.d_model}, layers {mcfg.n_layer}, heads {mcfg.n_head} (kv {mcfg.n_kv_head}), "
        f"head_dim {mcfg.head_dim}, d_ff {mcfg.d_ff}, vocab {mcfg.vocab_size}, context {mcfg.max_seq_len}"
    )
    print(f"  training FLOPs/token at full context: {model.flops_per_token() / 1e6:.1f}M")
    return 0
