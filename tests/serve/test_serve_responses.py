"""POST /v1/responses through the official `openai` client: the same answers as the chat route (greedy), streamed
events the SDK parses, max_output_tokens, a function-call round trip, structured output, refused inputs."""

from __future__ import annotations

import json

import openai
import pytest
from test_serve_concurrency import assert_freed_and_cancelled, metric, open_request

MODEL = "tiny-test"
QUESTION = "What is the weather in Paris?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CITY = {
    "type": "json_schema",
    "name": "city",
    "schema": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def respond(client, **kw):
    return client.responses.create(**{"model": MODEL, "max_output_tokens": 12, "temperature": 0.0, **kw})


def chat(client, messages, **kw):
    args = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0.0, **kw}
    return client.chat.completions.create(**args)


def test_a_text_response_is_the_chat_answer(client, live):
    r = respond(client, input=QUESTION)
    c = chat(client, [{"role": "user", "content": QUESTION}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert r.output_text == c.choices[0].message.content  # greedy: the same conversation, the same text
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.usage.output_tokens == c.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.status == ("incomplete" if c.choices[0].finish_reason == "length" else "completed")


def test_instructions_are_a_system_message(client, live):
    """instructions, developer messages and input_text parts give the prompt the chat route builds."""
    items = [
        {"role": "developer", "content": "Answer in French."},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "Where is "}, {"type": "input_text", "text": "x?"}],
        },
    ]
    r = respond(client, instructions="You are terse.", input=items)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Where is x?"},
    ]
    c = chat(client, messages)
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == len(
        live.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    )
    assert r.instructions == "You are terse."
    without = respond(client, input=items)
    assert without.usage.input_tokens < r.usage.input_tokens


def test_max_output_tokens_makes_it_incomplete(client):
    r = respond(client, input="Talk.", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete" and r.max_output_tokens == 2


def test_a_stream_says_what_the_whole_response_says(client):
    whole = respond(client, input=QUESTION)
    events = list(respond(client, input=QUESTION, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete" if whole.status == "incomplete" else "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-2].item.content[0].text == events[-4].text
    final = events[-1].response
    assert final.output_text == text and final.usage.model_dump() == whole.usage.model_dump()
    assert final.id == events[0].response.id and events[0].response.status == "in_progress"


def test_structured_output_streamed_with_the_sdk_helper(client):
    """text.format json_schema is enforced while decoding; the SDK's stream helper assembles the final response."""
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=40, text={"format": CITY}) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert final.status == "completed" and final.text.format.type == "json_schema"
    assert json.loads(final.output_text)["city"] in ("Paris", "Rome") and "".join(deltas) == final.output_text
    whole = respond(client, input=QUESTION, max_output_tokens=40, text={"format": CITY})
    assert json.loads(whole.output_text)["city"] in ("Paris", "Rome")


def test_a_forced_function_call_round_trip(client):
    """The call comes back as a function_call item; sent back with its output, the model answers in a message that
    is the chat route's answer to the same conversation."""
    forced = {"type": "function", "name": "get_weather"}
    first = respond(client, input=QUESTION, tools=[WEATHER], tool_choice=forced, max_output_tokens=40)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome", "Oslo")
    assert first.status == "completed" and first.tool_choice.name == "get_weather"

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}
    items = [{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True), result]
    second = respond(client, input=items, tools=[WEATHER], tool_choice="none")
    assert [o.type for o in second.output] == ["message"]
    tool = {k: v for k, v in WEATHER.items() if k != "type"}
    messages = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ],
        },  # noqa: E501
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"celsius": 21}'},
    ]
    c = chat(client, messages, tools=[{"type": "function", "function": tool}], tool_choice="none")
    assert second.output_text == c.choices[0].message.content
    assert second.usage.input_tokens == c.usage.prompt_tokens


def test_a_streamed_function_call(client):
    events = list(
        respond(client, input=QUESTION, tools=[WEATHER], tool_choice="required", max_output_tokens=40, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ], kinds
    added, delta, done, item_done, completed = events[2:]
    assert added.item.type == "function_call" and added.item.arguments == "" and added.item.status == "in_progress"
    assert delta.delta == done.arguments == item_done.item.arguments and json.loads(done.arguments)["city"]
    assert completed.response.output[0].model_dump() == item_done.item.model_dump()
    assert item_done.item.call_id == added.item.call_id and delta.item_id == added.item.id


def test_a_streaming_client_that_hangs_up_frees_its_slot(live, raw_request):
    """A string that must be 900 characters long keeps the model busy until the client leaves."""
    cancelled = metric(raw_request, live.url, 'requests_total{status="cancelled"}')
    generated = metric(raw_request, live.url, "generation_tokens_total")
    long = {"type": "json_schema", "name": "t", "schema": {"type": "string", "minLength": 900}}
    body = {"model": MODEL, "input": "Talk.", "max_output_tokens": 900, "stream": True, "text": {"format": long}}
    sock = open_request(live.url, "/v1/responses", json.dumps(body))
    received = b""
    while received.count(b"response.output_text.delta") < 10:  # a few tokens streamed: it holds a slot now
        received += sock.recv(4096)
    assert metric(raw_request, live.url, "running_sequences") == 1
    sock.close()
    assert_freed_and_cancelled(live, raw_request, cancelled, generated, 900)


BAD = [
    ({"input": "hi", "max_tokens": 5}, "max_tokens", "Unrecognized request argument"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "keeps no state"),
    ({"input": "hi", "store": True}, "store", "keeps no responses"),
    ({"input": 5}, "input", "a string or a list of items"),
    ({"input": []}, "input", "at least 1"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0]", "function_call_output or reasoning"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "reasoning item must come right before"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content[0].type",
        "input_text",
    ),  # noqa: E501
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "user"),
    ({"input": "hi", "tool_choice": "required"}, None, "tool_choice requires tools"),
    (
        {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
        "text.format.json_schema.schema",
        "required",
    ),
    (
        {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "1"}]},
        "input",
        "answers no tool call",
    ),
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD, ids=[str(p) + " " + w for _, p, w in BAD])
def test_bad_requests_are_400_naming_the_field(live, raw_request, extra, param, words):
    status, body = raw_request(live.url, "POST", "/v1/responses", json.dumps({"model": MODEL, **extra}).encode())
    assert status == 400, body
    assert body["error"]["param"] == param and words in body["error"]["message"], body


def test_unknown_model_is_404_and_the_route_is_documented(client, live, raw_request):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-17", input="hi")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    _, doc = raw_request(live.url, "GET", "/openapi.json")
    content = doc["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/event-stream"}
