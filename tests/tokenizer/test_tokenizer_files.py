"""Directories: save/load round trips, atomic writes, transformers both ways, and every load error."""

import json
from pathlib import Path

import pytest

from tinychat.errors import UserError
from tinychat.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")

# Qwen2.5's chat template without its tool branch: a default system prompt, so it differs from ours.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MSGS = [{"role": "user", "content": "Hello 123, 你好!"}, {"role": "assistant", "content": "Hi."}]
SAMPLE = "The quick brown fox 12345 今天天气很好 🙂 <|im_end|>\n\n  def f(x):"


def fresh_backend(tok: Tokenizer):
    """A copy of the Rust tokenizer in its saved (structural) mode, as transformers would load it."""
    from tokenizers import Tokenizer as RustTokenizer

    return RustTokenizer.from_str(tok.backend.to_str())


def hf_saved_dir(tok: Tokenizer, path: Path, template: str = QWEN_TEMPLATE) -> Path:
    """A directory exactly as transformers writes it for a Qwen-style tokenizer."""
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=fresh_backend(tok), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = template
    hf.save_pretrained(str(path))
    return path


def test_round_trip(tok, saved_dir):
    loaded = Tokenizer.from_pretrained(saved_dir)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.decode(loaded.encode(SAMPLE)) == SAMPLE
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.eot_id, loaded.im_end_id, loaded.pad_id, loaded.stop_ids) == (0, 2, 0, {0, 2})
    assert loaded.render_chat(MSGS).ids == tok.render_chat(MSGS).ids
    assert [loaded.id_to_token(i) for i in range(16)] == list(SPECIAL_TOKENS)


def test_saved_files_follow_the_hf_layout(tok, saved_dir):
    names = {p.name for p in saved_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"} == names
    cfg = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    assert cfg["chat_template"] == CHAT_TEMPLATE == (saved_dir / "chat_template.jinja").read_text()
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert [cfg["added_tokens_decoder"][str(i)]["content"] for i in range(16)] == list(SPECIAL_TOKENS)
    assert all(v["special"] for v in cfg["added_tokens_decoder"].values())
    assert isinstance(cfg["model_max_length"], int)
    # the saved tokenizer.json recognises specials (transformers needs them in the rendered template)
    raw = json.loads((saved_dir / "tokenizer.json").read_text())
    assert raw["normalizer"] is None and raw["model"]["type"] == "BPE"


def test_autotokenizer_opens_it(hf_tok, tok):
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>" and hf_tok.bos_token is None
    assert hf_tok.eos_token_id == tok.im_end_id and hf_tok.pad_token_id == tok.eot_id
    ids = tok.encode("hello 12 world")
    assert hf_tok("hello 12 world")["input_ids"] == ids  # no BOS/EOS added
    assert hf_tok.decode(ids + [tok.im_end_id], skip_special_tokens=True) == "hello 12 world"


def test_save_keeps_other_files_and_leaves_no_temp(tok, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("old")
    tok.model_max_length = 512
    try:
        tok.save_pretrained(d)
    finally:
        tok.model_max_length = None
    assert (d / "model.safetensors").read_bytes() == b"weights" and (d / "config.json").read_text() == "{}"
    assert Tokenizer.from_pretrained(d).model_max_length == 512
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_save_changes_nothing(tok, tmp_path, monkeypatch):
    tok.save_pretrained(tmp_path / "t")
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    real_write = Path.write_text

    def failing_write(self, text, *a, **kw):
        if self.name == "special_tokens_map.json":
            raise OSError(28, "No space left on device")
        return real_write(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", failing_write)
    other = Tokenizer(fresh_backend(tok), chat_template="{{ messages }}")
    with pytest.raises(OSError):
        other.save_pretrained(tmp_path / "t")
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_opens_a_transformers_saved_directory(tok, tmp_path):
    d = hf_saved_dir(tok, tmp_path / "hf")
    assert (d / "chat_template.jinja").is_file()  # transformers 5 keeps the template here
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_pretrained(d)
    assert ours.chat_template == QWEN_TEMPLATE
    assert ours.eos_token == "<|im_end|>" and ours.eos_id == tok.im_end_id
    assert ours.encode(SAMPLE) == tok.encode(SAMPLE)
    for gen in (False, True):
        text = hf.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(MSGS, add_generation_prompt=gen) == text
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
        hf_ids = hf.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=gen)
        hf_ids = list(hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids)
        assert ours.apply_chat_template(MSGS, add_generation_prompt=gen, tokenize=True) == hf_ids
    # saving it again keeps its template and reopens in transformers
    ours.save_pretrained(tmp_path / "again")
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    assert again.apply_chat_template(MSGS, tokenize=False) == hf.apply_chat_template(MSGS, tokenize=False)


def test_opens_template_inside_tokenizer_config(tok, tmp_path):
    """Older transformers (and most Hub repos) keep the template and AddedToken dicts in the config."""
    d = hf_saved_dir(tok, tmp_path / "old")
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": QWEN_TEMPLATE}, {"name": "rag", "template": "x"}]
    cfg["eos_token"] = {"content": "<|im_end|>", "lstrip": False, "rstrip": False, "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.from_pretrained(d)
    assert ours.chat_template == QWEN_TEMPLATE and ours.eos_token == "<|im_end|>"


def test_opens_a_llama_style_tokenizer(tmp_path):
    """No <|endoftext|> and no ChatML: eot falls back to the config's eos; BOS is never added by encode()."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rust.train_from_iterator(["hello llama world"] * 20, trainer)
    rust.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    hf.save_pretrained(str(tmp_path))
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.eot_id == ours.eos_id == 2 and ours.pad_id == 2
    assert ours.im_start_id is None and ours.im_end_id is None and ours.stop_ids == {2}
    assert ours.bos_token == "<|begin_of_text|>"
    assert ours.encode("hello world")[0] != 0
    assert ours.decode(ours.encode("hello world")) == "hello world"


def _write_dir(tmp_path: Path, tok: Tokenizer) -> Path:
    d = tmp_path / "tok"
    tok.save_pretrained(d)
    return d


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match=f"tokenizer directory {tmp_path / 'nope'} does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_missing_file(tok, tmp_path, name):
    d = _write_dir(tmp_path, tok)
    (d / name).unlink()
    with pytest.raises(UserError, match=f"{d / name} is missing"):
        Tokenizer.from_pretrained(d)


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("tokenizer.json", '{"version": "1.0", "model": ', "is not valid JSON"),
        ("tokenizer_config.json", "{'eos_token': 1}", "is not valid JSON"),
        ("tokenizer.json", "{}", "is not a valid tokenizer.json"),
        ("tokenizer_config.json", "[1, 2]", "must hold a JSON object"),
        ("tokenizer_config.json", b"\xff\xfe{}", "is not valid JSON"),
    ],
)
def test_corrupt_file_is_named(tok, tmp_path, name, content, pattern):
    d = _write_dir(tmp_path, tok)
    if isinstance(content, bytes):
        (d / name).write_bytes(content)
    else:
        (d / name).write_text(content)
    with pytest.raises(UserError, match=pattern) as e:
        Tokenizer.from_pretrained(d)
    assert str(d / name) in str(e.value)
