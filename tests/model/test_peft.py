"""The PEFT family: each method's shapes and gradients, PEFT's file format both ways (logits within 1e-4 of
the real `peft` package), the KV cache with virtual tokens, and merging where a method allows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinychat.errors import UserError
from tinychat.model import Model
from tinychat.model.peft import PeftConfig, adapters_disabled, apply_peft, load_adapter, merge_adapters, save_result
from tinychat.model.peft.adapters import Bottleneck
from tinychat.model.peft.ia3 import IA3Linear
from tinychat.model.peft.lora import LoraConfig, LoRALinear
from tinychat.model.peft.unipelt import PrefixGate

X = torch.randint(16, 200, (2, 12))
VIRTUAL = ["prompt", "ptuning", "prefix", "ptuning_v2"]
PEFT_HAS = ["lora", "dora", "ia3", *VIRTUAL]
OURS = ["houlsby", "parallel", "mam", "unipelt"]  # tinychat's own format
ALL = [*PEFT_HAS, *OURS]


def logits(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def adapted(base_dir: Path, method: str, **kw) -> tuple[Model, PeftConfig, LoraConfig]:
    """The base with `method` applied and its adapter weights moved off their identity start (as after training)."""
    model = Model.from_pretrained(str(base_dir), dtype=torch.float32)
    pcfg, lcfg = (
        PeftConfig(method=method, virtual_tokens=5, encoder_hidden=24, **kw),
        LoraConfig(targets=["q", "v", "down"]),
    )
    torch.manual_seed(0)
    apply_peft(model, pcfg, lcfg)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
            if m.lora_magnitude_vector is not None:
                m.lora_magnitude_vector.data.mul_(1 + 0.1 * torch.randn_like(m.lora_magnitude_vector))
        if isinstance(m, IA3Linear):
            m.ia3_l.data.add_(0.2 * torch.randn_like(m.ia3_l))
        if isinstance(m, Bottleneck):
            torch.nn.init.normal_(m.up.weight, std=0.1)
        if isinstance(m, PrefixGate):  # gates that differ per layer and head, some near 0 (the base's attention)
            torch.nn.init.normal_(m.weight, std=0.5)
            torch.nn.init.normal_(m.bias, std=2.0)
    return model, pcfg, lcfg


def save(model: Model, lcfg: LoraConfig, base_dir: Path, out: Path) -> Path:
    """Where the stage writes its PEFT adapter: out/adapter for mergeable methods, out itself for virtual tokens."""
    merged = save_result(out, model, model.state_dict(), lcfg, base_dir)
    return out if merged is None else out / "adapter"


@pytest.mark.parametrize("method", ALL)
def test_each_method_starts_near_the_base_and_trains_only_its_adapter(tiny_model_dir: Path, method: str):
    base = Model.from_pretrained(str(tiny_model_dir))
    model = Model.from_pretrained(str(tiny_model_dir))
    summary = apply_peft(model, PeftConfig(method=method, virtual_tokens=4), LoraConfig())
    assert method in summary and "trainable" in summary
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k not in dict(base.named_parameters()) for k in trainable)  # base frozen
    total = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in trainable.values()) < 0.2 * total
    if method in ("lora", "dora", "ia3", "houlsby", "parallel"):  # identity at step 0
        torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)
    model.train()
    loss = model(X).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in trainable.values())  # (LoRA's A has a zero gradient while B = 0)
    assert sum(float(p.grad.abs().sum()) > 0 for p in trainable.values()) >= len(trainable) / 2 or method == "unipelt"
    if method == "unipelt":  # what reads a zero-initialised B / up gets no gradient yet; everything else does
        waits = (".lora_A.", ".lora_gate.", ".adapter.down.", ".adapter.gate.")
        moving = {k: p for k, p in trainable.items() if not any(w in k for w in waits)}
        assert len(moving) >= 10 and all(float(p.grad.abs().sum()) > 0 for p in moving.values()), moving.keys()
    assert all(p.grad is None for k, p in model.named_parameters() if not p.requires_grad)
    with adapters_disabled(model):
        torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", PEFT_HAS)
def test_peft_opens_our_adapter(tiny_model_dir: Path, tmp_path: Path, method: str):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, pcfg, lcfg = adapted(tiny_model_dir, method, encoder="lstm" if method == "ptuning" else "mlp")
    ours = logits(model)
    where = save(model, lcfg, tiny_model_dir, tmp_path / "stage")
    conf = json.loads((where / "adapter_config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, where).eval()
    with torch.no_grad():
        theirs = pm(X).logits
    n = conf.get("num_virtual_tokens", 0) if conf["peft_type"] in ("PROMPT_TUNING", "P_TUNING") else 0
    torch.testing.assert_close(theirs[:, n:], ours, atol=1e-4, rtol=0)  # PEFT returns the virtual positions too
    again = Model.from_pretrained(str(tiny_model_dir))
    load_adapter(again, where)
    torch.testing.assert_close(logits(again), ours, atol=1e-5, rtol=0)


PEFT_CONFIGS = {
    "prompt": lambda p, d: p.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="a b",
        tokenizer_name_or_path=str(d),
    ),
    "ptuning_mlp": lambda p, d: p.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16
    ),
    "ptuning_lstm": lambda p, d: p.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix": lambda p, d: p.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix_projection": lambda p, d: p.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
    ),
    "ia3": lambda p, d: p.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "o_proj", "up_proj", "down_proj"]),
    "dora": lambda p, d: p.LoraConfig(
        task_type="CAUSAL_LM",
        r=3,
        lora_alpha=6,
        use_dora=True,
        target_modules=["q_proj", "gate_proj"],
        init_lora_weights=False,
    ),
}


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_we_open_peft_adapters(tiny_model_dir: Path, tmp_path: Path, name: str):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, PEFT_CONFIGS[name](peft, tiny_model_dir))
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if p.requires_grad and "ia3_l" in k:
                p.add_(0.2 * torch.randn_like(p))
            elif p.requires_grad and "magnitude" in k:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(X).logits
    n = expected.shape[1] - X.shape[1]
    ours = Model.from_pretrained(str(tiny_model_dir))
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected[:, n:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", OURS)
def test_our_adapters_round_trip_through_their_format(tiny_model_dir: Path, tmp_path: Path, method: str):
    model, _, lcfg = adapted(tiny_model_dir, method)
    ours = logits(model)
    assert (ours - logits(Model.from_pretrained(str(tiny_model_dir)))).abs().max() > 1e-3
    where = save(model, lcfg, tiny_model_dir, tmp_path / "stage")
    conf = json.loads((where / "adapter_config.json").read_text())
    assert conf["peft_type"] == method.upper() and conf["tinychat_format"] == 1 and conf["adapter_dim"] == 16
    assert conf.get("adapter_scale", 1.0) == (4.0 if method == "mam" else 1.0)
    again = Model.from_pretrained(str(where))  # an adapter directory opens as base + adapter, unmerged
    torch.testing.assert_close(logits(again), ours, atol=1e-6, rtol=0)
    half = Model.from_pretrained(str(where), dtype=torch.bfloat16)  # a bf16 base (serve --dtype auto on a GPU)
    assert (logits(half).float() - ours).abs().max() < 0.5
    with pytest.raises(UserError, match="cannot be merged"):
        merge_adapters(again)


@pytest.mark.parametrize("method", [*VIRTUAL, "mam", "unipelt"])
def test_the_kv_cache_accounts_for_virtual_tokens(tiny_model_dir: Path, method: str):
    """Prefill + one-token decode steps through the cache give the logits of the cache-less forward."""
    model, _, _ = adapted(tiny_model_dir, method)
    full = logits(model)
    cache = model.new_cache(2, max_len=X.shape[1])
    assert cache.max_len == X.shape[1] + 5  # room for the virtual tokens
    with torch.no_grad():
        pre = model(X[:, :7], cache)
        steps = [model(X[:, t : t + 1], cache) for t in range(7, X.shape[1])]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), full, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [5 + X.shape[1]] * 2


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_merge_gives_the_unmerged_logits(tiny_model_dir: Path, tmp_path: Path, method: str, capsys):
    from tinychat.cli import main

    model, _, lcfg = adapted(tiny_model_dir, method)
    unmerged = logits(model)
    where = save(model, lcfg, tiny_model_dir, tmp_path / "stage")
    merged_dir = tmp_path / "stage"  # save_result returned the merged state; write it as the stage would
    assert main(["merge", "--adapter", str(where), "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(logits(Model.from_pretrained(str(tmp_path / "merged"))), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(merge_adapters(model)), unmerged, atol=1e-5, rtol=0)
    assert not any(isinstance(m, LoRALinear | IA3Linear) for m in model.modules())
    assert not merged_dir.joinpath("config.json").exists()


def test_virtual_tokens_cannot_merge_and_bad_flags_fail(tiny_model_dir: Path, tmp_path: Path, capsys):
    from tinychat.cli import main

    model, _, lcfg = adapted(tiny_model_dir, "prefix")
    save(model, lcfg, tiny_model_dir, tmp_path / "stage")
    with pytest.raises(UserError, match="cannot be merged"):
        merge_adapters(model)
    assert main(["merge", "--adapter", str(tmp_path / "stage"), "--out", str(tmp_path / "m")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    with pytest.raises(UserError, match="--lora.. is for"):
        PeftConfig(method="ia3").resolve(LoraConfig(rank=4))
    with pytest.raises(UserError, match="unknown target"):
        PeftConfig(method="ia3", targets=["zz"]).resolve(LoraConfig())
    assert PeftConfig().resolve(LoraConfig(rank=4)) == "lora" and PeftConfig().resolve(LoraConfig()) == "none"


def test_prompt_tuning_starts_from_the_init_text(tiny_model_dir: Path, tiny_tokenizer):
    model = Model.from_pretrained(str(tiny_model_dir))
    ids = tiny_tokenizer.encode("the cat")
    apply_peft(model, PeftConfig(method="prompt", virtual_tokens=5, init_text="the cat"), LoraConfig(), init_ids=ids)
    want = model.model.embed_tokens.weight[torch.tensor((ids * 5)[:5])]
    torch.testing.assert_close(model.virtual_tokens.embedding.weight, want)


def test_ptuning_v2_starts_as_the_model_reading_its_init_text(tiny_model_dir: Path, tiny_tokenizer):
    """P-tuning v2's deep prompt starts as the keys/values of real tokens (Li & Liang's init from real words), so
    at step 0 the adapted model reading X equals the base model reading the init text and then X."""
    base = Model.from_pretrained(str(tiny_model_dir))
    model = Model.from_pretrained(str(tiny_model_dir))
    text_ids = tiny_tokenizer.encode("the cat sat")
    pcfg = PeftConfig(method="ptuning_v2", virtual_tokens=5, init_text="the cat sat")
    apply_peft(model, pcfg, LoraConfig(), init_ids=text_ids)
    ids = torch.tensor((text_ids * 5)[:5])
    want = logits(base, torch.cat([ids[None].expand(2, -1), X], dim=1))[:, 5:]
    torch.testing.assert_close(logits(model), want, atol=1e-4, rtol=0)
    assert model.virtual_tokens.embedding.weight.requires_grad
    other = Model.from_pretrained(str(tiny_model_dir))
    apply_peft(other, PeftConfig(method="ptuning_v2", virtual_tokens=5), LoraConfig())  # random tokens' activations
    assert not torch.allclose(logits(other), logits(model), atol=1e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_lora_over_an_integer_base(tiny_model_dir: Path, tmp_path: Path, bits: int):
    from tinychat.model.compress.quant import QuantLinear, quantize_blocks

    quantized = quantize_blocks(Model.from_pretrained(str(tiny_model_dir)), bits, 32)
    model = Model.from_pretrained(str(tiny_model_dir))
    lcfg = LoraConfig(targets=["all"])
    summary = apply_peft(model, PeftConfig(method="qlora", bits=bits, group_size=32), lcfg)
    assert f"int{bits} base" in summary
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * model.cfg.n_layer  # head stays float
    torch.testing.assert_close(logits(model), logits(quantized), atol=1e-5, rtol=0)  # B = 0: the int base
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    model.train()
    model(X).float().logsumexp(-1).mean().backward()  # through the integer kernels (QuantLinear's IntMatmul backward)
    a0 = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert a0.grad is not None and a0.grad.abs().sum() > 0
    assert all(not p.requires_grad for k, p in model.named_parameters() if ".lora_" not in k)
    unmerged = logits(model)
    assert save_result(tmp_path / "stage", model, model.state_dict(), lcfg, tiny_model_dir) is None
    conf = json.loads((tmp_path / "stage" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["base_model_name_or_path"] == str(tiny_model_dir.absolute())
    on_float = Model.from_pretrained(str(tmp_path / "stage"))  # the adapter merged into the float base
    err = (logits(on_float) - unmerged).abs().max()
    assert err < (0.3 if bits == 4 else 0.05)  # only the quantization error of the base


@pytest.mark.parametrize(("method", "block_size"), [("prompt", 4), ("mam", 5), ("ptuning_v2", 4), ("unipelt", 4)])
def test_virtual_tokens_decode_in_both_caches(tiny_model_dir: Path, tiny_tokenizer, method: str, block_size: int):
    """Ragged batched decoding over the contiguous KV cache (virtual tokens preloaded into fresh rows) gives
    each prompt's own greedy tokens, the first being the cache-less forward's argmax; so does the paged serving
    engine, whose sequences share the virtual tokens' blocks (a partial last block copied on write when
    5 virtual tokens fill blocks of 4), also batched, with chunked prefill, from the prefix cache, and for
    n = 2 choices."""
    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams

    model, _, _ = adapted(tiny_model_dir, method)
    model.eval()
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_on_eos=False)
    prompts = [tiny_tokenizer.encode(t) for t in ["the cat sat on the mat", "a", "tiny models learn to chat " * 3]]
    ref = [generate_ids(model, [p], params, set())[0][0] for p in prompts]
    with torch.no_grad():  # the first generated token is the cache-less forward's argmax
        assert [r[0] for r in ref] == [int(model(torch.tensor([p]))[0, -1].argmax()) for p in prompts]
    assert generate_ids(model, prompts, params, set())[0] == ref
    engine = Engine(model, tiny_tokenizer, EngineConfig(max_num_seqs=3, prefill_chunk=4, block_size=block_size))
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(p, params)) for p in prompts]
        assert [collect(h, 1)[0][0]["token_ids"] for h in handles] == ref
        again = collect(engine.submit(GenerationRequest(prompts[2], params)), 1)[0][0]["token_ids"]
        assert again == ref[2] and engine.stats.prefix_hit_tokens > 0  # its prompt's blocks came from the cache
        two = collect(engine.submit(GenerationRequest(prompts[0], params, n=2)), 2)[0]
        assert [c["token_ids"] for c in two] == [ref[0], ref[0]]
        too_long = GenerationRequest(prompts[0], SamplingParams(max_new_tokens=model.cfg.max_seq_len - 7))
        with pytest.raises(UserError, match="5 virtual tokens"):  # the window counts the virtual tokens
            engine.submit(too_long)
    finally:
        engine.stop()
    tiny_pool = EngineConfig(block_size=4, kv_cache_mb=2 * engine.cache.block_bytes / 2**20)
    with pytest.raises(UserError, match="cannot hold the adapter's 5 virtual tokens"):
        Engine(model, tiny_tokenizer, tiny_pool)


def test_virtual_tokens_in_a_tight_kv_pool(tiny_model_dir: Path, tiny_tokenizer):
    """With 5 virtual tokens in blocks of 4 (one full block shared through the prefix cache, one partial block
    copied on write): requests admitted together never run the pool dry (prefill in small chunks, so admitted
    sequences wait before their copy), a request the pool says it can hold runs instead of waiting forever,
    and a client's context is the window less the virtual tokens."""
    import concurrent.futures

    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams

    model, _, _ = adapted(tiny_model_dir, "ptuning_v2")
    model.eval()
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_on_eos=False)
    prompts = [tiny_tokenizer.encode(t) for t in ["the cat sat on the mat", "a b c", "tiny models", "learn to chat"]]
    ref = [generate_ids(model, [p], params, set())[0][0] for p in prompts]
    probe = Engine(model, tiny_tokenizer, EngineConfig(block_size=4))
    assert probe.context == probe.max_len - 5
    worst = max(probe.sched.worst_case(GenerationRequest(p, params)) for p in prompts)

    def pool(blocks: int, **kw) -> EngineConfig:
        return EngineConfig(block_size=4, kv_cache_mb=blocks * probe.cache.block_bytes / 2**20, **kw)

    engine = Engine(model, tiny_tokenizer, pool(1 + 2 + 2 * worst, max_num_seqs=4, prefill_chunk=2)).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:  # all four at once: some run, the others wait
            handles = [engine.submit(GenerationRequest(p, params)) for p in prompts]
            outs = list(ex.map(lambda h: collect(h, 1), handles, timeout=60))
        assert [o[0][0]["token_ids"] for o in outs] == ref and all(o[1].error is None for o in outs)
    finally:
        engine.stop()
    ex = concurrent.futures.ThreadPoolExecutor(1)
    for blocks in range(worst - 1, worst + 4):
        e = Engine(model, tiny_tokenizer, pool(blocks)).start()
        try:
            req = GenerationRequest(prompts[0], params)
            if not e.sched.fits_ever(req):
                with pytest.raises(UserError, match="do not fit"):
                    e.submit(req)
                continue
            choices, done = ex.submit(collect, e.submit(req), 1).result(timeout=30)  # runs, never waits forever
            assert choices[0]["token_ids"] == ref[0] and done.error is None
        finally:
            e.stop()  # (a request stuck waiting is failed here, so the collecting thread ends)
    ex.shutdown()


def test_unipelt_gates_turn_each_part_on_and_off(tiny_model_dir: Path):
    """A prefix gate near 0 leaves the base's attention (LoRA and adapter at zero: the base model exactly), a gate
    near 1 is plain prefix tuning with the same prefix; the gate reads the query without its rotary position."""
    from tinychat.model.peft import prompt
    from tinychat.model.transformer import rope_tables, rotate

    base = Model.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model, _, _ = adapted(tiny_model_dir, "unipelt")
    assert (logits(model) - logits(base)).abs().max() > 1e-2
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.zeros_(m.lora_B.weight)
        if isinstance(m, Bottleneck):
            torch.nn.init.zeros_(m.up.weight)
    gate = model.virtual_tokens.gate
    torch.nn.init.zeros_(gate.weight)
    torch.nn.init.constant_(gate.bias, -60.0)  # G = e^-60: the prefix's weights vanish
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)
    torch.nn.init.constant_(gate.bias, 60.0)  # G = 1: prefix tuning
    plain = Model.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    vt = prompt.attach_virtual_tokens(plain, prompt.PromptSpec(kind="prefix", n=5, trained=False))
    with torch.no_grad():
        vt.embedding.weight.copy_(model.virtual_tokens.prompts())
    torch.testing.assert_close(logits(model), logits(plain), atol=1e-5, rtol=0)
    torch.nn.init.normal_(gate.weight)
    torch.nn.init.zeros_(gate.bias)
    q0 = torch.randn(1, model.cfg.n_head, 1, model.cfg.head_dim)
    at = [rotate(q0, *rope_tables(torch.tensor([[p]]), model.inv_freq, torch.float32)) for p in (3, 40)]
    g3, g40 = (gate.log_gate(1, q, torch.tensor([[p]]), model.inv_freq) for q, p in zip(at, (3, 40)))
    torch.testing.assert_close(g3, g40, atol=1e-5, rtol=0)
    assert (g3 - gate.log_gate(1, at[1], torch.tensor([[3]]), model.inv_freq)).abs().max() > 1e-3


def test_a_broken_unipelt_adapter_is_one_sentence(tiny_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    model, _, lcfg = adapted(tiny_model_dir, "unipelt")
    where = save(model, lcfg, tiny_model_dir, tmp_path / "stage")
    conf = json.loads((where / "adapter_config.json").read_text())
    (where / "adapter_config.json").write_text(json.dumps({k: v for k, v in conf.items() if k != "r"}))
    with pytest.raises(UserError, match="needs r, lora_alpha"):
        Model.from_pretrained(str(where))
    (where / "adapter_config.json").write_text(json.dumps(conf))
    tensors = load_file(str(where / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "prefix_gate.bias"}, str(where / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="prefix_gate.bias is missing"):
        Model.from_pretrained(str(where))
    (where / "adapter_config.json").write_text(json.dumps({**conf, "num_layers": 7}))
    with pytest.raises(UserError, match="do not match this base model"):
        Model.from_pretrained(str(where))
