"""`model resize-vocab`: old rows kept (equal logits on old tokens, in transformers too), new rows the mean of
their old sub-token rows or random, tied and untied models, bad input refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinychat.cli import main
from tinychat.model import Model, preset
from tinychat.tokenizer import Tokenizer
from tinychat.tokenizer.extend import extend_tokenizer

ZH = ["今天天气很好我们一起去公园散步。", "小模型学习说话和调用工具。", "北京上海出生于城市公司。"] * 20


@pytest.fixture(scope="module")
def dirs(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An extended tokenizer, and a tied and an untied tiny model with the old one."""
    root = tmp_path_factory.mktemp("resize")
    new, _ = extend_tokenizer(tiny_tokenizer, ZH, 30)
    new.save_pretrained(root / "tok_ext")
    out = {"tok_ext": root / "tok_ext"}
    for tied in (True, False):
        torch.manual_seed(0)
        cfg = preset("tiny", vocab_size=tiny_tokenizer.vocab_size, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                     head_dim=16, d_ff=128, max_seq_len=64, tie_embeddings=tied)  # fmt: skip
        d = root / f"model_tied{tied}"
        Model(cfg).save_pretrained(str(d))
        tiny_tokenizer.save_pretrained(d)
        out[f"tied{tied}"] = d
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_mean_init_keeps_old_rows_and_averages_sub_tokens(dirs, tied: bool, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    src, out = dirs[f"tied{tied}"], tmp_path / "resized"
    args = ["model", "resize-vocab", "--model", str(src), "--tokenizer", str(dirs["tok_ext"]), "--out", str(out)]
    assert main(args) == 0
    old_tok, new_tok = Tokenizer.from_pretrained(src), Tokenizer.from_pretrained(out)
    assert new_tok.vocab_size == old_tok.vocab_size + 30
    a, b = Model.from_pretrained(str(src)), Model.from_pretrained(str(out))
    n_old = a.cfg.vocab_size
    assert b.cfg.vocab_size == new_tok.vocab_size and b.cfg.tie_embeddings == tied
    text = "the quick brown fox 12 + 7"
    x = torch.tensor([old_tok.encode(text)])
    assert int(x.max()) < n_old
    with torch.no_grad():
        la, lb = a(x), b(x)
    torch.testing.assert_close(lb[..., :n_old], la, atol=1e-5, rtol=0)  # old tokens: the same model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits[..., :n_old], la, atol=1e-4, rtol=0)
    # a new token's rows: the mean of the rows of the old tokens its text is made of
    zh = ZH[0]
    new_ids = [i for i in new_tok.encode(zh) if i >= n_old]
    assert new_ids
    whole = [i for i in new_ids if "\ufffd" not in new_tok.decode([i])]  # whole characters: encodable alone
    assert whole
    for i in whole[:3]:
        pieces = old_tok.encode(new_tok.decode([i]))
        assert len(pieces) > 1
        for wa, wb in (
            (a.model.embed_tokens.weight, b.model.embed_tokens.weight),
            (a.lm_head.weight, b.lm_head.weight),
        ):
            torch.testing.assert_close(wb[i], wa[pieces].mean(0))
    assert hf.config.tie_word_embeddings == tied
    assert hf.get_input_embeddings().weight.shape[0] == new_tok.vocab_size


def test_random_init_and_errors(dirs, tmp_path: Path, tiny_tokenizer, capsys):
    src = dirs["tiedFalse"]
    out = tmp_path / "random"
    assert main(["model", "resize-vocab", "--model", str(src), "--tokenizer", str(dirs["tok_ext"]),
                 "--init", "random", "--seed", "3", "--out", str(out)]) == 0  # fmt: skip
    a, b = Model.from_pretrained(str(src)), Model.from_pretrained(str(out))
    n = a.cfg.vocab_size
    torch.testing.assert_close(b.model.embed_tokens.weight[:n], a.model.embed_tokens.weight, atol=0, rtol=0)
    new_rows = b.model.embed_tokens.weight[n:]
    assert abs(float(new_rows.std()) - a.cfg.init_std) < 0.005  # Normal(0, init_std), not copies of old rows
    assert not torch.equal(b.lm_head.weight[n:], new_rows)  # untied: each matrix its own draw
    capsys.readouterr()
    # a tokenizer that is not an extension of the model's own: old ids moved
    other = tmp_path / "other"
    from tinychat.tokenizer import train_tokenizer

    train_tokenizer(["completely different text " * 50, *ZH], 330).save_pretrained(other)
    assert (
        main(["model", "resize-vocab", "--model", str(src), "--tokenizer", str(other), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "does not extend" in capsys.readouterr().err
    assert (
        main(["model", "resize-vocab", "--model", str(src), "--tokenizer", str(src), "--out", str(tmp_path / "x")]) == 2
    )
    assert "adds no tokens" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
