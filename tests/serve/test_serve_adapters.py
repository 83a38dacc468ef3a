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
