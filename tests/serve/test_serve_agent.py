"""The agent loop against a live `tinychat serve`: the OpenAI tool-calling round trip over real HTTP.

The served model is random, so its calls are forced with the server's grammar-constrained tool_choice on the
first turn (a scripted agent could not test the server); what is checked is the protocol: tools offered,
calls parsed by the server, executed by the registry, results sent back as tool messages, an answer at the end.
"""

from __future__ import annotations

from typing import Any, Literal

from conftest import API_KEY, MODEL_NAME

from tinychat.agent.loop import Agent, LoopConfig
from tinychat.agent.tools import Registry, tool
from tinychat.infer.chat_backend import RemoteChat


@tool
def weather(city: Literal["Paris", "Rome"]) -> str:
    """Today's weather in a city (an enum keeps the random model's forced call short).

    Args:
        city: the city
    """
    return {"Paris": "rain, 12 C", "Rome": "sun, 21 C"}[city]


class ForcedFirstCall(RemoteChat):
    """RemoteChat whose first request forces a weather call (tool_choice), later ones leave the model free."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.calls = 0

    def chat(self, messages, tools=None, max_tokens=256):  # noqa: ANN001, ANN201
        self.calls += 1
        if self.calls > 1 or not tools:
            return super().chat(messages, tools, max_tokens)
        body = {"model": self.name, "messages": messages, "tools": tools, "max_tokens": 64, "temperature": 0}
        body["tool_choice"] = {"type": "function", "function": {"name": "weather"}}
        msg = self._request("/chat/completions", body)["choices"][0]["message"]
        return {"role": "assistant", "content": msg.get("content") or "", "tool_calls": msg["tool_calls"]}


def test_agent_round_trip_against_a_live_server(live) -> None:  # noqa: ANN001
    backend = ForcedFirstCall(live.url, api_key=API_KEY)
    assert backend.name == MODEL_NAME
    res = Agent(backend, Registry([weather]), LoopConfig(max_steps=3, max_tokens=8)).run("Weather in Rome?")
    first_tool = next(s for s in res.steps if s.kind == "tool")
    assert first_tool.name == "weather" and first_tool.ok  # the server parsed the forced call into tool_calls
    assert first_tool.result in ("rain, 12 C", "sun, 21 C")
    assert res.tool_calls >= 1 and res.model_calls >= 2  # the tool result went back to the server
    assert res.stopped in ("answer", "max_steps")
