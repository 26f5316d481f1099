"""The OpenAI contract as clients use it, on a live `assistant serve` with the embedded SmolLM2 behind an
API key and a user: the official `openai` client, LangChain's ChatOpenAI and gradio_client. Structured
output (json_schema, json_object), tool calls (required, named, a round trip, streamed), logprobs, n,
legacy completions, models.retrieve, and the error shapes of unknown routes, methods and media types."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from helpers import running_server

pytestmark = pytest.mark.slow
KEY, USER, PASSWORD = "test-key", "ann", "secret-pw"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                 "population": {"type": "integer"}},
               "required": ["city", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time of a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 40}},
                   "required": ["tz"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_path):
    home = tmp_path_factory.mktemp("contract-home")
    with running_server(home, "--api-key", KEY, "--auth", f"{USER}:{PASSWORD}") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


# asks for the keys it wants: "a cat as JSON" lets the small model's greedy answer invent keys without end
CAT = "Describe a cat named Tom who is 3 years old as a JSON object with the keys name and age."


def _valid_city(obj):
    assert set(obj) == {"city", "population"}
    assert isinstance(obj["city"], str) and isinstance(obj["population"], int) and not isinstance(
        obj["population"], bool)


def test_json_schema_output_parses_and_validates(client):
    r = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA,
                                                                 "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    _valid_city(json.loads(r.choices[0].message.content))


def test_json_object_output_parses(client):
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": CAT}],
                                       response_format={"type": "json_object"}, max_tokens=120)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_required_and_named_tool_choice_always_call(client):
    msgs = [{"role": "user", "content": "Hello there!"}]   # nothing asks for a tool: the choice forces one
    r = client.chat.completions.create(model="base", messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    named = client.chat.completions.create(model="base", messages=msgs, tools=[WEATHER, TIME], max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments)["tz"], str)
    assert named.choices[0].message.content is None


def test_tool_round_trip_and_its_feedback_reaches_the_dataset(client, server):
    """Call, tool result, final answer, on a domain; a thumbs-up on the final answer becomes a dataset row
    that keeps the tool turns."""
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(server + "/api/domains", json={"name": "weather"}, headers=auth).status_code == 201
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="weather", messages=msgs, tools=[WEATHER], max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    call = message.tool_calls[0]
    msgs += [message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"weather": "sunny", "celsius": 21})}]
    final = client.chat.completions.create(model="weather", messages=msgs, tools=[WEATHER], tool_choice="none",
                                           max_tokens=40)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    fb = httpx.post(server + "/api/feedback", headers=auth, timeout=60,
                    json={"response_id": final.id, "rating": "down", "correction": "It is sunny in Paris, 21 C."})
    assert fb.status_code == 201
    rows = [json.loads(line) for line in httpx.get(server + "/api/domains/weather/dataset/export",
                                                    headers=auth, timeout=120).text.splitlines()]
    turns = json.dumps([r["messages"] for r in rows])
    assert "get_weather" in turns and "sunny" in turns and "<tool_response>" in turns, turns[:500]


def test_streamed_tool_call_deltas_assemble(client):
    stream = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60)
    calls, reasons = {}, []
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or ():
                slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
            reasons.append(c.finish_reason)
    assert calls[0]["name"] == "get_weather" and "city" in json.loads(calls[0]["arguments"])
    assert [r for r in reasons if r] == ["tool_calls"]


def test_logprobs_sum_to_the_sequence_score(client, server, embedded_path):
    """Greedy: each token is its own top-1, and the logprobs add up to the model's log-likelihood of the
    answer, computed here by a plain transformers forward of prompt + answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    r = client.chat.completions.create(model="base", messages=FRANCE, max_tokens=12, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    dtype = getattr(torch, httpx.get(server + "/api/health", headers={"Authorization": f"Bearer {KEY}"}).json()["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(embedded_path), dtype=dtype)
    prompt = tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    answer = tok("".join(t.token for t in content), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([list(prompt) + answer])).logits[0].float(), -1)
    score = sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))
    assert sum(t.logprob for t in content) == pytest.approx(score, abs=0.05 * len(answer) + 0.05)
    streamed = client.chat.completions.create(model="base", messages=FRANCE, max_tokens=12, logprobs=True,
                                              stream=True)
    tokens = [t.token for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert tokens == [t.token for t in content]


def test_n_choices_with_a_seed_repeat(client):
    ask = dict(model="base", messages=[{"role": "user", "content": "Name an animal."}], n=3, seed=11,
               temperature=1.0, max_tokens=12)
    a, b = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1   # three rows, three generators
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**ask, "n": 99})
    assert e.value.body["param"] == "n"


def test_legacy_completions_equal_chat_for_the_same_prompt(client, embedded_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    rendered = tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    chat = client.chat.completions.create(model="base", messages=FRANCE, max_tokens=20)
    legacy = client.completions.create(model="base", prompt=rendered, max_tokens=20)
    assert legacy.object == "text_completion" and legacy.choices[0].text == chat.choices[0].message.content
    two = client.completions.create(model="base", prompt=[rendered, "The sky is"], max_tokens=5, echo=True,
                                    logprobs=2)
    assert len(two.choices) == 2 and two.choices[1].text.startswith("The sky is")
    assert len(two.choices[1].logprobs.tokens) == len(two.choices[1].logprobs.token_logprobs) > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="def f(", suffix="return 1")
    assert e.value.body["param"] == "suffix"


def test_models_retrieve_and_error_shapes(client, server):
    assert client.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, server + path, headers=auth)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    form = httpx.post(server + "/api/domains", content=b'{"name": "evil"}', headers={**auth, "Content-Type":
                                                                                      "text/plain"})
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    assert "evil" not in [d["name"] for d in httpx.get(server + "/api/domains", headers=auth).json()]   # not created
    bad = httpx.post(server + "/v1/chat/completions", headers=auth,
                     json={"model": "base", "messages": FRANCE, "max_completion_tokens": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_completion_tokens"
    schema = httpx.get(server + "/api/openapi.json", headers=auth).json()
    assert "ChatRequest" in schema["components"]["schemas"] and "CompletionRequest" in schema["components"]["schemas"]


def test_developer_role_and_penalties(client):
    r = client.chat.completions.create(model="base", max_tokens=20, frequency_penalty=1.5, presence_penalty=0.5,
                                       logit_bias={"28": -100},
                                       messages=[{"role": "developer", "content": "Answer briefly."}, *FRANCE])
    assert r.choices[0].message.content


def test_langchain_structured_output(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city and its population."""
        city: str = Field(max_length=40)
        population: int

    llm = ChatOpenAI(base_url=server + "/v1", api_key=KEY, model="base", temperature=0, max_tokens=80,
                     max_retries=0)
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(City, method=method).invoke("Describe Paris.")
        assert isinstance(out, City), method
    # json_mode sends no schema (response_format json_object): any object is valid, so the prompt asks for one
    as_json = llm.with_structured_output({"title": "cat", "type": "object"}, method="json_mode").invoke(
        CAT)
    assert isinstance(as_json, dict)

    @tool
    def get_weather(city: str) -> str:
        """The current weather of a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and "city" in msg.tool_calls[0]["args"]


def test_gradio_client_signs_in_and_chats_with_a_new_domain(server):
    from gradio_client import Client
    c = Client(server + "/", auth=(USER, PASSWORD), verbose=False)
    created = httpx.post(server + "/api/domains", json={"name": "latecomer", "system_prompt": "Be brief."},
                         headers={"Authorization": f"Bearer {KEY}"})
    assert created.status_code == 201
    api = c.view_api(return_format="dict", print_info=False)
    name = next(n for n in api["named_endpoints"] if n.startswith("/respond"))
    out = c.predict("What is the capital of France?", [], "latecomer", "", 0.0, 16, api_name=name)   # State is no API input
    history = out[1]
    assert history and history[-1]["role"] == "assistant" and history[-1]["content"]
