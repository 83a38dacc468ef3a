"""The lm-evaluation-harness adapter: its three methods against hand-computed values, then lm-eval itself offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinychat.eval.backend import load
from tinychat.eval.harness import HarnessModel, rolling_windows
from tinychat.infer import SamplingParams, generate


@pytest.fixture(scope="module")
def core(tiny_model_dir: Path) -> HarnessModel:
    model, tok = load(tiny_model_dir)
    return HarnessModel(model, tok, batch_size=3)


def logprob(model: torch.nn.Module, ids: list[int], n_target: int) -> tuple[float, bool]:
    """log p(last n_target ids | the ones before), straight from one forward pass."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    rows, target = logp[-n_target:], torch.tensor(ids[-n_target:])
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def test_loglikelihood(core: HarnessModel) -> None:
    tok = core.tok
    reqs = [("the quick brown", " fox"), ("the quick brown ", "fox"), ("", "hello there"), ("a", " lazy dog jumps")]
    got = core.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        if ctx:
            c = ctx.rstrip()
            cont_full = ctx[len(c) :] + cont  # trailing spaces of the context belong to the continuation
            whole, ctx_ids = tok.encode(c + cont_full), tok.encode(c)
            ids, n = whole, len(whole) - len(ctx_ids)
        else:
            cont_ids = tok.encode(cont)
            ids, n = [tok.eot_id, *cont_ids], len(cont_ids)
        want_ll, want_greedy = logprob(core.model, ids, n)
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
    assert got[0][0] == pytest.approx(got[1][0], abs=1e-6)  # the same text, split differently


def test_greedy_flag_is_true_for_the_models_own_continuation(core: HarnessModel) -> None:
    out = generate(
        core.model, core.tok, "the quick", SamplingParams(temperature=0, max_new_tokens=3, stop_on_eos=False)
    )
    cont = core.tok.decode(out[0].token_ids)
    ctx_ids, cont_ids = core.encode_pair("the quick", cont)
    if cont_ids == out[0].token_ids:  # re-encoding a decoded continuation can merge differently; skip then
        assert core.loglikelihood([("the quick", cont)])[0][1] is True


def test_loglikelihood_rolling(core: HarnessModel) -> None:
    tok, L = core.tok, core.max_length
    short = "the small model learns to chat"
    ids = tok.encode(short)
    want, _ = logprob(core.model, [tok.eot_id, *ids], len(ids))
    long_text = " ".join(["the quick brown fox jumps over a lazy dog 1234"] * 30)
    long_ids = tok.encode(long_text)
    assert len(long_ids) > 2 * L
    want_long = 0.0
    for ctx, tgt in rolling_windows(long_ids, tok.eot_id, L):
        assert len(ctx) + len(tgt) - 1 <= L
        want_long += logprob(core.model, [*ctx, *tgt], len(tgt))[0]
    got = core.loglikelihood_rolling([(short,), (long_text,)])
    assert got[0] == pytest.approx(want, abs=1e-4)
    assert got[1] == pytest.approx(want_long, rel=1e-5)


def test_rolling_windows_predict_every_token_once() -> None:
    for n, L in [(1, 4), (4, 4), (5, 4), (10, 4), (23, 7)]:
        toks = list(range(100, 100 + n))
        wins = list(rolling_windows(toks, 0, L))
        assert [t for _, tgt in wins for t in tgt] == toks
        full = [0, *toks]
        for ctx, tgt in wins:
            seq = ctx + tgt
            assert len(seq) - 1 <= L  # the model input fits the window
            end = full.index(tgt[-1]) + 1
            assert seq == full[end - len(seq) : end]  # contiguous: each target sees the text right before it


def test_generate_until(core: HarnessModel) -> None:
    reqs = [("the quick", {"until": ["\n"], "max_gen_toks": 6}), ("a lazy", {"until": "dog", "max_gen_toks": 4})]
    got = core.generate_until(reqs)
    for (ctx, kw), text in zip(reqs, got):
        until = [kw["until"]] if isinstance(kw["until"], str) else kw["until"]
        p = SamplingParams(temperature=0, max_new_tokens=kw["max_gen_toks"], stop=until)
        assert text == generate(core.model, core.tok, ctx, p)[0].text


TASKS = {
    "tc_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
    "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n",
    "tc_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[label]}}'\n"
    "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n",
    "tc_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    "metric_list:\n  - metric: word_perplexity\n",
}
DOCS = [
    {"question": "the quick brown", "choices": ["fox", "dog"], "label": 0, "text": "the quick brown fox jumps"},
    {"question": "a lazy", "choices": ["dog", "model"], "label": 0, "text": "the small model learns to chat"},
    {"question": "call", "choices": ["tools", "fox"], "label": 1, "text": "then the model learns to call tools"},
]


def test_lm_eval_runs_offline_on_a_local_task(core: HarnessModel, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tinychat.eval.harness import TinychatLM

    if TinychatLM is None:
        print("SKIP: lm-eval is not installed (pip install tinychat[eval]); the adapter's methods are tested above.")
        pytest.skip("lm-eval is not installed (pip install tinychat[eval])")
    from tinychat.eval.run import run_harness

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        head = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {tmp_path / 'hf-cache'}\ntest_split: test\n"
        )
        (tmp_path / f"{name}.yaml").write_text(head + body)
    res = run_harness(core, str(tiny_model_dir), list(TASKS), include=str(tmp_path), defaults=False)
    assert set(res) == set(TASKS)
    # multiple choice = argmax of our own loglikelihood over the choices (lm-eval puts a space before each)
    want = sum(
        max(range(2), key=lambda j, d=d: core.loglikelihood([(d["question"], " " + d["choices"][j])])[0][0])
        == d["label"]
        for d in DOCS
    ) / len(DOCS)
    assert res["tc_mc"]["acc"] == pytest.approx(want)
    gens = core.generate_until([(d["question"], {"until": ["\n"], "max_gen_toks": 6}) for d in DOCS])
    want_em = sum(g == d["choices"][d["label"]] for g, d in zip(gens, DOCS)) / len(DOCS)
    assert res["tc_gen"]["exact_match"] == pytest.approx(want_em)
    # word perplexity = exp(-sum loglikelihood_rolling / words)
    lls = core.loglikelihood_rolling([(d["text"],) for d in DOCS])
    words = sum(len(d["text"].split()) for d in DOCS)
    assert res["tc_ppl"]["word_perplexity"] == pytest.approx(float(torch.tensor(-sum(lls) / words).exp()), rel=1e-4)
