"""Client input that once crashed a handler (500) is a 400 naming the field: token ids outside the vocabulary,
lone surrogates in any text, booleans where ints are expected; and an integral number such as 2.0 is an int."""

from __future__ import annotations

import json

import pytest

MODEL = "tiny-test"
SURROGATE = "hi \\ud800"  # JSON text for a lone surrogate: valid JSON, no valid UTF-8


def post(raw_request, live, path: str, body: str) -> tuple[int, dict]:  # noqa: ANN001
    return raw_request(live.url, "POST", path, body.encode())


@pytest.mark.parametrize(
    ("prompt", "why"),
    [("[-1]", "negative"), (f"[{2**40}]", "huge"), ("[[0, 99999]]", "past the vocabulary"), ("[[false]]", "bool")],
)
def test_bad_token_ids_are_400(live, raw_request, prompt: str, why: str) -> None:  # noqa: ANN001
    status, body = post(raw_request, live, "/v1/completions", f'{{"model": "{MODEL}", "prompt": {prompt}}}')
    assert status == 400 and body["error"]["param"] == "prompt", (why, body)
    status, body = post(raw_request, live, "/v1/embeddings", f'{{"model": "{MODEL}", "input": {prompt}}}')
    assert status == 400 and body["error"]["param"] == "input", (why, body)


def test_the_vocabulary_bound_is_the_models(live, raw_request) -> None:  # noqa: ANN001
    V = live.engine.model.cfg.vocab_size
    status, body = post(raw_request, live, "/v1/completions", f'{{"model": "{MODEL}", "prompt": [{V - 1}]}}')
    assert status == 200, body
    status, body = post(raw_request, live, "/v1/completions", f'{{"model": "{MODEL}", "prompt": [{V}]}}')
    assert status == 400 and f"0..{V - 1}" in body["error"]["message"]


def chat(model: str = f'"{MODEL}"', content: str = '"hi"', extra: str = "") -> str:
    return f'{{"model": {model}, "messages": [{{"role": "user", "content": {content}}}], "max_tokens": 2{extra}}}'


TOOL = ', "tools": [{"type": "function", "function": {"name": "f", "description": "x \\ud800"}}]'


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat(content=f'"{SURROGATE}"'), "messages[0].content"),
        ("/v1/chat/completions", chat(model=f'"{SURROGATE}"'), "model"),
        ("/v1/chat/completions", chat(extra=TOOL), "tools[0].function.description"),
        ("/v1/chat/completions", chat(extra=', "stop": ["\\udfff"]'), "stop"),
        ("/v1/chat/completions", chat(extra=', "\\ud800": 1'), None),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "{SURROGATE}"}}', "prompt"),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": ["ok", "{SURROGATE}"]}}', "prompt"),
        ("/v1/embeddings", f'{{"model": "{MODEL}", "input": "{SURROGATE}"}}', "input"),
    ],
)
def test_lone_surrogates_are_400(live, raw_request, path: str, body: str, param: str | None) -> None:  # noqa: ANN001
    json.loads(body)  # the test's own JSON is valid
    status, out = post(raw_request, live, path, body)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["message"].endswith("."), out


@pytest.mark.parametrize(
    "extra",
    ['"max_tokens": true', '"n": true', '"top_k": false', '"seed": true', '"logit_bias": {"\\u00b2": 1}'],
)
def test_booleans_and_odd_digits_are_not_ints(live, raw_request, extra: str) -> None:  # noqa: ANN001
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], {extra}}}'
    status, out = post(raw_request, live, "/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == extra.split('"')[1], out
    status, out = post(raw_request, live, "/v1/completions", f'{{"model": "{MODEL}", "prompt": "a", "logprobs": true}}')
    assert status == 400 and out["error"]["param"] == "logprobs", out


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(extra=', "n": 2.0, "seed": 7.0, "top_k": 5.0, "max_completion_tokens": 2.0')),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": [5.0, 6], "max_tokens": 2.0, "logprobs": 1.0}}'),
        ("/v1/embeddings", f'{{"model": "{MODEL}", "input": [[5.0, 6], [7]], "dimensions": 64.0}}'),
    ],
)
def test_integral_numbers_are_ints(live, raw_request, path: str, body: str) -> None:  # noqa: ANN001
    """2.0 is an integer to JSON and to the OpenAPI document's JSON Schema; schemathesis sent such requests, valid by
    the document, and got 400s. 2.5 still is no integer."""
    status, out = post(raw_request, live, path, body)
    assert status == 200, out
    status, out = post(
        raw_request, live, path, body.replace("2.0", "2.5").replace("5.0", "5.5").replace("64.0", "64.5")
    )
    assert status == 400, out


def test_undecodable_bytes_in_a_path_are_no_500(live, raw_request) -> None:  # noqa: ANN001
    status, body = raw_request(live.url, "GET", "/v1/models/%ED%A0%80%FF")
    assert status == 404 and body["error"]["param"] == "model", body
