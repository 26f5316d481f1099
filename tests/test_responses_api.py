"""OpenAI's Responses API through the clients that call it by default, unchanged, against a live `assistant
serve` (the 2-layer Llama): the `openai` client's `responses.create` (whole and streamed, continued by
`previous_response_id`, read back and deleted), function tools round trips and structured output, the OpenAI
Agents SDK's default model, LangChain with `use_responses_api`, and from Node the `openai` package and the
Vercel AI SDK's default model (generateText, streamText, generateObject: tests/node, which
`scripts/setup.sh --test` installs). Each greedy answer equals the same conversation asked through
`/v1/chat/completions`, and is logged so it can be rated."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from helpers import running_server

pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).parent / "node"
NODE_TIMEOUT_S = 300
SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y", "z"]}, "b": {"type": "boolean"},
                                           "c": {"type": "integer"}},
          "required": ["a", "b", "c"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("responses-home")
    with running_server(home, "--base-model", str(tiny_llama), "--dtype", "float32") as (url, _):
        yield url


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory, embedded_path):
    """The embedded SmolLM2, for the agent that must finish its answer after a tool's result (the random
    Llama never says it is done, and an agent fails an answer cut at max_output_tokens, as it should)."""
    home = tmp_path_factory.mktemp("responses-embedded")
    with running_server(home, timeout=300) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client, messages, n=20, **kw):
    r = client.chat.completions.create(model="base", messages=messages, max_tokens=n, temperature=0, **kw)
    return r


def test_responses_equal_chat_stream_continue_read_and_delete(server, client):
    q1, q2 = "What is two plus two?", "And three plus three?"
    r = client.responses.create(model="base", input=q1, max_output_tokens=20, temperature=0)
    c = chat(client, [{"role": "user", "content": q1}])
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.output_text == c.choices[0].message.content
    assert r.status == ("incomplete" if c.choices[0].finish_reason == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.usage.input_tokens_details.cached_tokens == 0

    # instructions are the system turn; streamed deltas add up to the whole answer
    ri = client.responses.create(model="base", input=q1, instructions="Answer briefly.", max_output_tokens=20,
                                 temperature=0)
    ci = chat(client, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q1}])
    assert ri.output_text == ci.choices[0].message.content
    events = list(client.responses.create(model="base", input=q1, max_output_tokens=20, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == f"response.{r.status}"
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                 "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert kind in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text

    # a stored response continues the conversation by its id, as the chat turns it stands for
    r2 = client.responses.create(model="base", input=q2, previous_response_id=r.id, max_output_tokens=20,
                                 temperature=0)
    c2 = chat(client, [{"role": "user", "content": q1}, {"role": "assistant", "content": r.output_text},
                       {"role": "user", "content": q2}])
    assert r2.output_text == c2.choices[0].message.content and r2.previous_response_id == r.id
    assert client.responses.retrieve(r.id).output_text == r.output_text

    # logged like a chat answer: it can be rated under its id
    fb = httpx.post(server + "/api/feedback", json={"response_id": r2.id, "rating": "down",
                                                     "correction": "Six."}, timeout=30)
    assert fb.status_code == 201, fb.text

    # store: false keeps nothing; a deleted response is gone; both answer 404 naming the field
    r3 = client.responses.create(model="base", input=q1, max_output_tokens=5, temperature=0, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r3.id)
    assert client.responses.delete(r.id) is None or True
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model="base", input=q2, previous_response_id=r.id, max_output_tokens=5)
    assert gone.value.body["param"] == "previous_response_id"


def test_function_tools_round_trip_structured_output_and_refusals(server, client):
    q = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(model="base", input=q, tools=[WEATHER], tool_choice="required",
                                max_output_tokens=40, temperature=0)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    assert call.call_id and call.id.startswith("fc_")

    # the same call, streamed: the arguments arrive as function_call_arguments events
    events = list(client.responses.create(model="base", input=q, tools=[WEATHER], tool_choice="required",
                                          max_output_tokens=40, temperature=0, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments

    # the tool's result goes back as function_call_output; the answer equals chat's with tool messages
    follow = q + [{"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                  {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]
    r2 = client.responses.create(model="base", input=follow, tools=[WEATHER], tool_choice="none",
                                 max_output_tokens=20, temperature=0)
    tool = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}
    c2 = chat(client, q + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}], tools=[tool], tool_choice="none")
    assert r2.output_text == c2.choices[0].message.content

    s = client.responses.create(model="base", input="Pick.", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "pick", "schema": SCHEMA}})
    obj = json.loads(s.output_text)
    assert set(obj) == {"a", "b", "c"} and obj["a"] in "xyz" and isinstance(obj["b"], bool)

    for body, param in (({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                         "input[0].content[0].type"),
                        ({"background": True}, "background")):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{"model": "base", "input": "hi", **body})
        assert e.value.body["param"] == param and "Traceback" not in e.value.body["message"]


def test_the_agents_sdk_default_model_calls_a_tool_and_returns_structured_output(embedded_server):
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled
    set_tracing_disabled(True)
    set_default_openai_client(openai.AsyncOpenAI(base_url=embedded_server + "/v1", api_key="unused", max_retries=0,
                                                 timeout=300), use_for_tracing=False)
    asked = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather in a city."""
        asked.append(city)
        return "Sunny, 21 C"

    agent = Agent(name="weather", instructions="You answer questions about the weather.", model="base",
                  tools=[get_weather], model_settings=ModelSettings(tool_choice="required", temperature=0,
                                                                     max_tokens=60, store=True,
                                                                     metadata={"test": "agents"}))

    class Pick(BaseModel):
        a: Literal["x", "y", "z"]
        b: bool
        c: int

    picker = Agent(name="picker", instructions="Pick.", model="base", output_type=Pick,
                   model_settings=ModelSettings(temperature=0, max_tokens=40))

    async def both():   # one event loop: the client's connections belong to it
        return await Runner.run(agent, "What is the weather in Paris?", max_turns=4), \
            await Runner.run(picker, "Pick one.")
    result, picked = asyncio.run(both())
    assert asked and asked[0] in ("Paris", "Oslo")
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds
    assert isinstance(result.final_output, str) and result.final_output
    assert result.raw_responses[-1].response_id.startswith("resp_")
    assert isinstance(picked.final_output, Pick)


def test_langchain_with_use_responses_api(server, client):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="base", temperature=0, max_retries=0,
                     timeout=300, use_responses_api=True, max_tokens=20)
    q = "Why is the sky blue?"
    want = chat(client, [{"role": "user", "content": q}]).choices[0].message.content
    got = llm.invoke(q)
    assert got.text == want
    assert "".join(c.text for c in llm.stream(q)) == want


def test_node_openai_and_the_ai_sdk_default_model(server, client):
    if shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir():
        pytest.fail("node and tests/node/node_modules are needed: run `bash scripts/setup.sh --test`")
    question, max_tokens = "Why is the sky blue?", 20
    env = dict(os.environ, BASE_URL=server, QUESTION=question, MAX_TOKENS=str(max_tokens))
    run = subprocess.run(["node", str(NODE_DIR / "clients.mjs")], env=env, cwd=NODE_DIR, capture_output=True,
                         text=True, timeout=NODE_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    want = chat(client, [{"role": "user", "content": question}], max_tokens).choices[0].message.content
    assert want
    for key in ("chat", "responses", "responses_stream", "ai_text", "ai_stream"):
        assert got[key] == want, key
    assert got["responses_id"].startswith("resp_")
    assert got["ai_finish"] in ("stop", "length")
    obj = got["ai_object"]
    assert set(obj) == {"a", "b", "c"} and obj["a"] in "xyz" and isinstance(obj["b"], bool)
