"""`tinychat serve --adapter NAME=DIR`: the OpenAI `model` field picks the base or a LoRA adapter, /v1/models
lists them, an unknown name is a 404 in one sentence, and bad --adapter values stop the command (exit 2)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from adapter_helpers import make_lora

from tinychat.cli import main
from tinychat.errors import UserError
from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
from tinychat.infer.sampling import SamplingParams
from tinychat.model import Model
from tinychat.serve.cli import parse_adapters
from tinychat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("served-adapters")
    return {name: make_lora(model_dir, tmp / name, seed=i, std=0.5) for i, name in enumerate(("fox", "dog"), 1)}


def merged_text(model_dir: Path, adapter: Path | None, prompt: str, n: int) -> str:
    """Greedy text of the model with `adapter` merged (or the base), alone in an engine of its own."""
    tok = Tokenizer.from_pretrained(model_dir)
    engine = Engine(Model.from_pretrained(str(adapter or model_dir)), tok, EngineConfig(max_num_seqs=1)).start()
    try:
        req = GenerationRequest(tok.encode(prompt), SamplingParams(temperature=0, max_new_tokens=n))
        return collect(engine.submit(req), 1)[0][0]["text"]
    finally:
        engine.stop()


def test_the_model_field_selects_the_adapter(model_dir, adapters, start_server):
    live = start_server(model_dir, EngineConfig(max_num_seqs=8), adapters=adapters)
    try:
        client = live.client()
        models = client.models.list().data
        MODEL_NAME = models[0].id  # noqa: N806 - the base's name (the serve tests' conftest sets it)
        assert [m.id for m in models] == [MODEL_NAME, "fox", "dog"] and "parent" not in models[0].model_extra
        assert models[1].model_extra["parent"] == MODEL_NAME and models[1].model_extra["root"] == str(adapters["fox"])
        assert client.models.retrieve("dog").id == "dog"
        prompt = "the quick brown fox"
        texts = {}
        for name in (MODEL_NAME, "fox", "dog"):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
            assert r.model == name
            texts[name] = r.choices[0].text
            assert texts[name] == merged_text(model_dir, adapters.get(name), prompt, 8)
        assert len(set(texts.values())) > 1
        chat = client.chat.completions.create(
            model="fox", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert chat.model == "fox"
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="cat", prompt=prompt, max_tokens=2)
        assert (
            e.value.body["message"]
            == f"The model 'cat' does not exist; this server serves '{MODEL_NAME}', 'fox', 'dog'."
        )
        with pytest.raises(openai.BadRequestError, match="embeddings come from the base model"):
            client.embeddings.create(model="fox", input="hello")
    finally:
        live.close()


def test_bad_adapter_flags_stop_the_command(model_dir, adapters, tmp_path, capsys):
    assert parse_adapters(["fox=/a", "dog = /b"], "base") == {"fox": "/a", "dog": "/b"}
    for bad, match in [
        (["fox"], "NAME=DIR"),
        (["=x"], "NAME=DIR"),
        (["a=x", "a=y"], "used twice"),
        (["base=x"], "twice"),
    ]:
        with pytest.raises(UserError, match=match):
            parse_adapters(bad, "base")
    argv = ["serve", "--model", str(model_dir), "--port", "0"]
    assert main([*argv, "--adapter", f"fox={tmp_path / 'missing'}"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert main([*argv, "--adapter", f"fox={adapters['fox']}", "--adapter_batching", "fast"]) == 2
    assert "adapter_batching" in capsys.readouterr().err


def test_adapters_load_and_unload_while_the_engine_runs(model_dir, adapters, tmp_path):
    """Free slots take adapters between engine steps; a slot reused by another adapter answers with the new
    weights (its prefix-cache blocks are not reused); an adapter still in use is not unloaded; a request
    submitted under an adapter that is gone before it starts fails in one sentence."""
    from tinychat.model.peft.multi_lora import serve_adapters

    tok = Tokenizer.from_pretrained(model_dir)
    model = Model.from_pretrained(str(model_dir))
    aset = serve_adapters(model, {"fox": adapters["fox"]}, capacity=2, max_rank=8)
    cat = make_lora(model_dir, tmp_path / "cat", seed=7, rank=8, targets=("q", "v", "down"), std=0.5)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4), aset)
    prompt, params = tok.encode("the quick brown fox"), SamplingParams(temperature=0, max_new_tokens=8)

    def text(name: str) -> str:
        return collect(engine.submit(GenerationRequest(prompt, params, adapter=name)), 1)[0][0]["text"]

    stale = engine.submit(GenerationRequest(prompt, params, adapter="fox"))  # queued before the engine runs
    aset.unload("fox")  # (the engine thread is not running yet, so this is safe here)
    engine.start()
    try:
        _, done = collect(stale, 1)
        assert done.error == "adapter 'fox' was unloaded before this request started"
        assert engine.load_adapter("fox", str(adapters["fox"])).result(10) == 1
        assert text("fox") == merged_text(model_dir, adapters["fox"], "the quick brown fox", 8)
        assert engine.load_adapter("dog", str(adapters["dog"])).result(10) == 2
        assert aset.served == ["fox", "dog"]
        with pytest.raises(UserError, match="all 2 adapter slots are in use"):
            engine.load_adapter("cat", str(cat)).result(10)
        with pytest.raises(UserError, match="already served"):
            engine.load_adapter("dog", str(adapters["fox"])).result(10)
        slow = engine.submit(
            GenerationRequest(prompt, SamplingParams(max_new_tokens=200, stop_on_eos=False), adapter="fox")
        )
        with pytest.raises(UserError, match="in use by 1 request"):
            engine.unload_adapter("fox").result(10)
        slow.cancel()  # unloading right after cancelling: the cancelled request no longer counts
        assert engine.unload_adapter("fox").result(10) == 1
        collect(slow, 1)
        assert engine.load_adapter("cat", str(cat)).result(10) == 1  # fox's slot, same prompt, new weights
        assert text("cat") == merged_text(model_dir, cat, "the quick brown fox", 8)
        assert text("dog") == merged_text(model_dir, adapters["dog"], "the quick brown fox", 8)
        with pytest.raises(UserError, match="unknown adapter 'fox'"):
            engine.submit(GenerationRequest(prompt, params, adapter="fox"))
        with pytest.raises(UserError, match="no adapter named 'fox'"):
            engine.unload_adapter("fox").result(10)
        big = make_lora(model_dir, tmp_path / "big", seed=8, rank=16)
        with pytest.raises(UserError, match="rank 16 is above this server's 8"):
            engine.load_adapter("big", str(big))
        # an adapter without q or gate (whose modules hold their fused groups' stacks), after requests that
        # built those stacks for the other adapters
        vup = make_lora(model_dir, tmp_path / "vup", seed=11, targets=("v", "up"), std=0.5)
        assert engine.unload_adapter("cat").result(10) == 1
        assert text("dog") == merged_text(model_dir, adapters["dog"], "the quick brown fox", 8)  # (builds stacks)
        assert engine.load_adapter("vup", str(vup)).result(10) == 1
        assert text("vup") == merged_text(model_dir, vup, "the quick brown fox", 8)
    finally:
        engine.stop()
    with pytest.raises(UserError, match="not running"):
        engine.load_adapter("owl", str(cat))
    with pytest.raises(UserError, match="stopped"):
        engine.submit(GenerationRequest(prompt, params, adapter="dog"))


def test_the_adapter_routes(model_dir, adapters, start_server, raw_request, tmp_path):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes) under --adapter_updates: only
    directories under the root are read; every refusal is a 4xx in one sentence."""
    import json

    root = tmp_path / "root"
    make_lora(model_dir, root / "owl", seed=9, std=0.5)
    outside = make_lora(model_dir, tmp_path / "elsewhere", seed=10)
    (root / "link").symlink_to(outside)
    (root / "filelink").mkdir()  # a directory inside whose files lead outside
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "filelink" / name).symlink_to(outside / name)
    for name, change in (("nor", lambda c: c.pop("r")), ("badr", lambda c: c.update(r="abc"))):
        make_lora(model_dir, root / name, seed=12)
        conf = json.loads((root / name / "adapter_config.json").read_text())
        change(conf)
        (root / name / "adapter_config.json").write_text(json.dumps(conf))
    live = start_server(model_dir, EngineConfig(max_num_seqs=4), adapter_slots=2, adapter_root=root)
    try:
        client = live.client()
        base = client.models.list().data[0].id

        def post(path: str, body: dict) -> tuple[int, dict]:
            return raw_request(live.url, "POST", path, json.dumps(body).encode())

        status, out = post("/v1/load_lora_adapter", {"lora_name": "owl", "lora_path": "owl"})
        assert status == 200 and out == {
            "id": "owl",
            "object": "adapter",
            "status": "loaded",
            "root": str(root / "owl"),
        }
        assert [m.id for m in client.models.list().data] == [base, "owl"]
        r = client.completions.create(model="owl", prompt="the quick brown fox", max_tokens=8, temperature=0)
        assert r.choices[0].text == merged_text(model_dir, root / "owl", "the quick brown fox", 8)
        refusals = [
            ({"lora_name": "x", "lora_path": "../elsewhere"}, 400, "must be a directory under"),
            ({"lora_name": "x", "lora_path": str(outside)}, 400, "must be a directory under"),
            ({"lora_name": "x", "lora_path": "link"}, 400, "must be a directory under"),
            ({"lora_name": "x", "lora_path": "missing"}, 400, "adapter_config.json"),
            ({"lora_name": "x", "lora_path": "filelink"}, 400, "must be a directory under"),
            ({"lora_name": "x", "lora_path": "a\u0000b"}, 400, "not a usable path"),
            ({"lora_name": "x", "lora_path": "nor"}, 400, "not a valid LoRA config"),
            ({"lora_name": "x", "lora_path": "badr"}, 400, "not a valid LoRA config"),
            ({"lora_name": "owl", "lora_path": "owl"}, 409, "already served"),
            ({"lora_name": base, "lora_path": "owl"}, 409, "base model's name"),
            ({"lora_name": "a b", "lora_path": "owl"}, 400, "lora_name"),
            ({"lora_name": "x"}, 400, "lora_path"),
        ]
        for body, code, text in refusals:
            status, out = post("/v1/load_lora_adapter", body)
            assert status == code and text in out["error"]["message"] + str(out["error"].get("param")), (body, out)
        status, out = post("/v1/unload_lora_adapter", {"lora_name": "cat"})
        assert status == 404 and "no adapter named 'cat'" in out["error"]["message"]
        status, out = post("/v1/unload_lora_adapter", {"lora_name": "owl"})
        assert status == 200 and out["status"] == "unloaded"
        assert [m.id for m in client.models.list().data] == [base]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="owl", prompt="hi", max_tokens=2)
    finally:
        live.close()
    plain = start_server(model_dir, EngineConfig(max_num_seqs=2))
    try:  # without --adapter_updates the routes do not exist
        assert (
            raw_request(plain.url, "POST", "/v1/load_lora_adapter", b'{"lora_name": "a", "lora_path": "b"}')[0] == 404
        )
    finally:
        plain.close()


def test_adapter_update_flags(model_dir, tmp_path, capsys):
    argv = ["serve", "--model", str(model_dir), "--port", "0"]
    assert main([*argv, "--max_adapters", "2"]) == 2
    assert "add it" in capsys.readouterr().err
    assert main([*argv, "--adapter_updates", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main([*argv, "--adapter_updates", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "would let anyone load adapters" in capsys.readouterr().err
