"""Several LoRA adapters over one base in one batch: every row gets exactly what the model with its own adapter
merged gives (both batching modes, fused or not), and bad adapter directories are refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_helpers import make_lora
from safetensors.torch import load_file, save_file

from tinychat.errors import UserError
from tinychat.model import Model, ModelConfig
from tinychat.model.peft import PeftConfig, apply_peft, save_result
from tinychat.model.peft.lora import LoraConfig
from tinychat.model.peft.multi_lora import MultiLoRALinear, serve_adapters

V = 300


def base_dir(path: Path, d_model: int = 64) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=V, d_model=d_model, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=128, init_std=0.2
    )
    Model(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("multi-lora")
    base = base_dir(tmp / "base")
    return {
        "base": base,
        "a": make_lora(base, tmp / "a", seed=1),  # every projection, rank 4
        "b": make_lora(base, tmp / "b", seed=2, rank=2, targets=("q", "v")),  # another rank, other targets
        "c": make_lora(base, tmp / "c", seed=3, rank=8, targets=("o", "down")),
    }


def served(dirs: dict[str, Path], mode: str) -> tuple[Model, object]:
    model = Model.from_pretrained(str(dirs["base"]))
    return model, serve_adapters(model, {k: dirs[k] for k in ("a", "b", "c")}, mode)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["mask", "gather", "group"])
def test_a_mixed_batch_equals_each_adapter_merged(dirs: dict[str, Path], mode: str, fused: bool):
    model, aset = served(dirs, mode)
    if fused:
        model.fuse_projections()
        assert model.model.layers[0].self_attn.qkv_weight is not None  # the base's q/k/v stay one matmul
    merged = {0: Model.from_pretrained(str(dirs["base"]))}  # an adapter directory opens merged into its base
    merged |= {aset.slot(k): Model.from_pretrained(str(dirs[k])) for k in ("a", "b", "c")}
    x = torch.randint(0, V, (6, 9))
    slots = [1, 0, 2, 3, 1, 2]
    with torch.no_grad():
        want = torch.cat([merged[s](x[i : i + 1]) for i, s in enumerate(slots)])
        got = model(x, adapters=aset.rows(slots, x.device, torch.float32))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (want - merged[0](x)).abs().amax() > 1.0  # the adapters really change the logits
        for s in (1, 2, 3):  # every row the same adapter: the plain-matmul path
            torch.testing.assert_close(
                model(x, adapters=aset.rows([s] * 6, x.device, torch.float32)), merged[s](x), atol=1e-4, rtol=1e-4
            )
        assert aset.rows([0] * 6, x.device, torch.float32) is None  # base rows only: no update at all
        torch.testing.assert_close(model(x), merged[0](x), atol=1e-5, rtol=1e-5)


def test_the_base_state_dict_is_unchanged(dirs: dict[str, Path]):
    model, aset = served(dirs, "mask")
    plain = Model.from_pretrained(str(dirs["base"]))
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert aset.names == ["a", "b", "c"] and aset.rank == 8
    wrapped = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(wrapped) == 2 * 7  # every projection some adapter targets, in both layers


def test_bad_adapters_are_refused_in_one_sentence(dirs: dict[str, Path], tmp_path: Path):
    def refused(adapters: dict, match: str, mode: str = "mask") -> None:
        model = Model.from_pretrained(str(dirs["base"]))
        with pytest.raises(UserError, match=match):
            serve_adapters(model, adapters, mode)
        assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())  # nothing half-applied

    refused({"x": tmp_path / "missing"}, "adapter_config.json")
    refused({"a": dirs["a"]}, "batching mode", mode="fastest")
    other = base_dir(tmp_path / "other", d_model=32)  # an adapter trained on another base
    refused({"a": dirs["a"], "o": make_lora(other, tmp_path / "o", seed=4)}, "is this the base")
    # DoRA and IA3 need per-adapter norms or scales of their own: served merged, not shared
    for method in ("dora", "ia3"):
        model = Model.from_pretrained(str(dirs["base"]))
        lcfg = LoraConfig()
        apply_peft(model, PeftConfig(method=method), lcfg)
        save_result(tmp_path / method, model, model.state_dict(), lcfg, dirs["base"])
        refused({"d": tmp_path / method / "adapter"}, "DoRA" if method == "dora" else "only LoRA")
    extra = tmp_path / "extra"  # a tensor beside the updates (here: an embedding) is not silently dropped
    extra.mkdir()
    (extra / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    tensors = load_file(str(dirs["a"] / "adapter_model.safetensors"))
    save_file(
        {**tensors, "base_model.model.model.embed_tokens.weight": torch.zeros(V, 64)},
        str(extra / "adapter_model.safetensors"),
    )
    refused({"e": extra}, "embed_tokens.weight is not a LoRA update")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(
        json.dumps({**json.loads((dirs["a"] / "adapter_config.json").read_text())})
    )
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    refused({"b": broken}, "not a readable safetensors")


def test_room_for_adapters_over_a_quantized_base(dirs: dict[str, Path]):
    """Free slots wrap float projections only: an int8 base starts, and an adapter for its integer projections is
    refused in one sentence."""
    from tinychat.model.compress.quant import quantize_blocks

    model = Model.from_pretrained(str(dirs["base"]))
    quantize_blocks(model, 8, 64)
    aset = serve_adapters(model, {}, capacity=2, max_rank=8)
    assert aset.served == [] and not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    with pytest.raises(UserError, match="does not match any projection"):
        aset.prepare("a", dirs["a"])
