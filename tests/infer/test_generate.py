"""Generation from text: seeds, stop strings, stop tokens, streaming, batches, the context window, the CLI."""

import pytest
import torch

from tinychat.errors import UserError
from tinychat.infer import SamplingParams, generate, generate_ids, stream
from tinychat.model import Model
from tinychat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def mt(tiny_model_dir):
    return Model.from_pretrained(str(tiny_model_dir)), Tokenizer.from_pretrained(tiny_model_dir)


def test_same_seed_same_text_other_seed_other_text(mt):
    model, tok = mt
    p = SamplingParams(temperature=1.0, max_new_tokens=20, seed=7, stop_on_eos=False)
    a = generate(model, tok, "the quick", p)[0]
    b = generate(model, tok, "the quick", p)[0]
    c = generate(
        model, tok, "the quick", SamplingParams(temperature=1.0, max_new_tokens=20, seed=8, stop_on_eos=False)
    )[0]
    assert a.text == b.text and a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.finish_reason == "length" and len(a.token_ids) == 20


def test_batched_prompts_equal_single_prompts_under_greedy(mt):
    model, tok = mt
    prompts = ["the", "a lazy dog and then the small", "今天"]
    p = SamplingParams(temperature=0, max_new_tokens=12, stop_on_eos=False)
    batched = [g.token_ids for g in generate(model, tok, prompts, p)]
    single = [generate(model, tok, q, p)[0].token_ids for q in prompts]
    assert batched == single


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_finished_rows_leave_the_batch_and_the_others_are_unchanged(mt, monkeypatch, penalty):
    """Rows stop after 1..20 tokens: the batch shrinks as they finish (KVCache.keep), and every row's tokens
    equal that prompt generated alone, with repetition penalties (per-row state that shrinks too)."""
    from tinychat.model.kv_cache import KVCache

    model, tok = mt
    prompts = [tok.encode(t) for t in ["the", "a lazy dog", "今天", "the quick brown", "dog", "a", "small", "then"]]
    stops = [1, 2, 3, 12, 2, 20, 1, 5]
    kept: list[int] = []
    keep = KVCache.keep
    monkeypatch.setattr(KVCache, "keep", lambda self, rows: (kept.append(len(rows)), keep(self, rows))[1])
    p = SamplingParams(temperature=0, max_new_tokens=24, stop_on_eos=False, repetition_penalty=penalty)
    counts = [0] * len(prompts)

    def on_token(row: int, _tok: int) -> bool:
        counts[row] += 1
        return counts[row] == stops[row]

    batched, reasons, _ = generate_ids(model, prompts, p, None, on_token)
    assert kept == [4, 2, 1]  # 8 rows -> 4 left after step 2, 2 after step 5, 1 after step 12
    single = [generate_ids(model, [q], p)[0][0] for q in prompts]
    assert batched == [s[:n] for s, n in zip(single, stops)]
    assert reasons == ["stop"] * len(prompts)


def test_shared_prefix_counts_common_leading_tokens_and_keeps_one_per_prompt():
    from tinychat.infer.generate import SHARED_PREFIX_MIN, shared_prefix

    n = SHARED_PREFIX_MIN
    head = list(range(100, 100 + n + 4))
    assert shared_prefix([head + [1, 2], head + [1, 3], head + [5]]) == n + 4
    assert shared_prefix([head, head + [7]]) == n + 3  # the shorter prompt keeps its last token
    assert shared_prefix([head[: n - 1] + [1], head[: n - 1] + [2]]) == 0  # too short to pay for a call
    assert shared_prefix([head + [1]]) == 0  # one prompt: nothing to share


def test_prompts_with_a_shared_prefix_compute_it_once_and_generate_as_alone(mt, monkeypatch):
    from tinychat.model.kv_cache import KVCache

    model, tok = mt
    system = tok.encode("a long shared system message that every prompt in the batch begins with, and more")
    prompts = [system + tok.encode(q) for q in ["the", "今天 the quick", "a lazy dog", "dog"]]
    shared: list[int] = []
    share = KVCache.share_prefix
    spy = lambda self, row=0: (shared.append(self._lengths[row]), share(self))[1]  # noqa: E731
    monkeypatch.setattr(KVCache, "share_prefix", spy)
    p = SamplingParams(temperature=0, max_new_tokens=10, stop_on_eos=False)
    batched = generate_ids(model, prompts, p)[0]
    assert shared and shared[0] >= len(system)  # the prefix went through the model once
    assert batched == [generate_ids(model, [q], p)[0][0] for q in prompts]


def test_forward_at_given_positions_equals_the_full_logits_there(mt):
    model, tok = mt
    x = torch.tensor([tok.encode("the quick brown fox")[:4], tok.encode("a lazy dog and")[:4]])
    at = torch.tensor([3, 1])
    with torch.no_grad():
        full, part = model(x), model(x, last=at)
    assert part.shape == (2, model.cfg.vocab_size)
    torch.testing.assert_close(part, full[torch.arange(2), at])


def test_stop_string_is_cut_and_reported(mt):
    model, tok = mt
    p = SamplingParams(temperature=0, max_new_tokens=30, stop_on_eos=False)
    full = generate(model, tok, "the quick", p)[0].text
    assert len(full) > 4
    stop = full[2:4]
    g = generate(model, tok, "the quick", SamplingParams(temperature=0, max_new_tokens=30, stop=[stop]))[0]
    assert g.finish_reason == "stop" and g.text == full[: full.index(stop)]


def test_stop_on_end_token(mt):
    model, tok = mt
    p = SamplingParams(temperature=0, max_new_tokens=5, stop_on_eos=False)
    first = generate_ids(model, [tok.encode("the quick")], p)[0][0][0]
    # make the first greedy token a stop token: generation ends at once, the token is not in the output
    new, reasons, _ = generate_ids(model, [tok.encode("the quick")], SamplingParams(temperature=0), {first})
    assert new == [[]] and reasons == ["stop"]


def test_streaming_pieces_join_to_the_text(mt):
    model, tok = mt
    p = SamplingParams(temperature=0.9, max_new_tokens=25, seed=3, stop_on_eos=False)
    pieces = list(stream(model, tok, "今天 the", p))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(model, tok, "今天 the", p)[0].text


def test_streaming_holds_back_possible_stop_prefixes(mt):
    model, tok = mt
    p = SamplingParams(temperature=0, max_new_tokens=30, stop_on_eos=False)
    full = generate(model, tok, "a lazy", p)[0].text
    stop = full[5:9]
    seen = []
    g = generate(
        model,
        tok,
        "a lazy",
        SamplingParams(temperature=0, max_new_tokens=30, stop=[stop]),
        on_text=lambda r, d: seen.append(d),
    )[0]
    assert "".join(seen) == g.text and stop not in "".join(seen)


def test_prompt_over_context_window(mt):
    model, tok = mt
    long = " ".join(["the quick brown fox"] * 100)
    assert len(tok.encode(long)) > model.cfg.max_seq_len
    with pytest.raises(UserError, match=r"tokens but the context window is 128"):
        generate(model, tok, long, SamplingParams(max_new_tokens=4))
    g = generate(model, tok, long, SamplingParams(max_new_tokens=4, temperature=0, stop_on_eos=False), truncate="left")[
        0
    ]
    assert g.prompt_tokens == 124 and len(g.token_ids) == 4


def test_generation_stops_at_the_context_window(mt):
    model, tok = mt
    ids = tok.encode(" ".join(["the quick brown fox"] * 100))[:120]
    assert len(ids) == 120
    new, reasons, _ = generate_ids(model, [ids], SamplingParams(temperature=0, max_new_tokens=50, stop_on_eos=False))
    assert len(new[0]) == 8 and reasons == ["length"]


def test_chat_prompt_as_ids_keeps_special_tokens(mt):
    model, tok = mt
    ids = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True).ids
    assert tok.im_start_id in ids
    g = generate(model, tok, ids, SamplingParams(temperature=0, max_new_tokens=3, stop_on_eos=False))[0]
    assert g.prompt_tokens == len(ids)


def test_cli_generate_streams_and_errors(tiny_model_dir, capsys):
    from tinychat.cli import main

    rc = main(
        ["generate", "--model", str(tiny_model_dir), "--prompt", "the quick", "--max-new-tokens", "5", "--seed", "1"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("the quick")
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "a",
            "b",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
            "--chat",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "--- [0]" in out and "--- [1]" in out
    assert main(["generate", "--model", "/no/such/dir", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and err.count("\n") == 1
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--top-p", "0"]) == 2


def test_cli_model_init_and_info(tmp_path, tiny_model_dir, capsys):
    from tinychat.cli import main

    out = tmp_path / "m"
    rc = main(
        [
            "model",
            "init",
            "--out",
            str(out),
            "--tokenizer",
            str(tiny_model_dir),
            "--model.n_layer",
            "1",
            "--model.d_model",
            "32",
            "--model.head_dim",
            "8",
            "--model.d_ff",
            "64",
        ]
    )
    assert rc == 0
    m = Model.from_pretrained(str(out))
    assert m.cfg.n_layer == 1 and m.cfg.vocab_size == Tokenizer.from_pretrained(out).vocab_size
    assert m.cfg.n_head == 4  # from the tiny preset
    assert main(["model", "info", str(out)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["model", "init", "--out", str(tmp_path / "x"), "--model.n_kv_head", "3"]) == 2
    torch.manual_seed(0)


def test_cli_chat_sends_real_special_tokens(tiny_model_dir, monkeypatch):
    """--chat renders the template to ids: <|im_start|> must reach the model as one special token, not text."""
    import sys

    from tinychat.cli import main

    gen_mod = sys.modules["tinychat.infer.generate"]  # the package re-exports a function of the same name

    seen = []
    real = gen_mod.generate

    def spy(model, tok, prompts, *a, **kw):
        seen.extend(prompts)
        return real(model, tok, prompts, *a, **kw)

    monkeypatch.setattr(gen_mod, "generate", spy)
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]) == 0
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    assert seen and isinstance(seen[0], list) and seen[0][0] == tok.im_start_id
