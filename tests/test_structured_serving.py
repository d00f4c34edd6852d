"""Structured outputs through a real `luffy serve` process, driven by OpenAI's own client: response_format with
`.parse()` and a pydantic model, vLLM's structured_outputs, tools, streaming, errors, metrics, and the contract
that a constrained request equals Engine.generate with the same grammar alone, whatever shares its batch.
Speculative decoding with a grammar is tested on Engine.generate (test_structured_generate.py): the scheduler's
speculative rounds are the same code (runtimes/speculative.py).

llama-pydoc's template does not render tools, so its tool calls use luffy's JSON fallback; the hermes and
llama3_json formats are covered in test_structured.py.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install 'luffy[serve]') is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
pydantic = pytest.importorskip("pydantic")

import luffy  # noqa: E402
from luffy.benchmarks.structured import validate  # noqa: E402

from .helpers import NAMED_FAMILIES, make_hf_dir  # noqa: E402
from .server_process import ServerProcess  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                           "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}$"}}, "required": ["zone"]}}}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def server(pydoc):
    with ServerProcess(pydoc.path, "--max-num-seqs", "4", "--served-model-name", "pydoc") as running:
        yield running


def alone(engine, prompt: str, max_tokens: int, **kwargs) -> str:
    ids = engine.tokenizer.encode(prompt).ids
    return engine.tokenizer.decode(engine.generate([ids], max_tokens, **kwargs)[0, len(ids):].tolist(),
                                   skip_special_tokens=True)


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


def test_constrained_and_free_requests_share_a_batch_and_each_equals_generate_alone(server, engine):
    client = server.client()
    cases = [("def parse(", {"json_schema": PERSON}, {"response_format": json_schema_format(PERSON)}),
             ("Return the", {"regex": "[A-Z][a-z]+ [0-9]{2}"}, {"structured_outputs": {"regex": "[A-Z][a-z]+ [0-9]{2}"}}),
             ("Open the", {}, {"ignore_eos": True}),
             ("The module", {"choice": ["os", "sys", "json"]}, {"structured_outputs": {"choice": ["os", "sys", "json"]}})]
    expected = [alone(engine, prompt, 48, do_sample=True, temperature=0.7, seed=5, **grammar)
                for prompt, grammar, _ in cases]

    def ask(case):
        prompt, _, extra = case
        got = client.completions.create(model="pydoc", prompt=prompt, max_tokens=48, temperature=0.7, seed=5,
                                        extra_body=extra)
        return got.choices[0]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(ask, cases))
    assert [c.text for c in choices] == expected
    validate(json.loads(choices[0].text), PERSON)
    assert choices[0].finish_reason == "stop" and choices[0].model_extra["structured_output"] == "complete"
    assert choices[3].text in ("os", "sys", "json") and "structured_output" not in choices[2].model_extra


def test_openai_parse_with_a_pydantic_model(server):
    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=24)
        age: int = pydantic.Field(ge=0, le=120)
        email: str | None

    client = server.client()
    done = client.chat.completions.parse(model="pydoc", messages=USER, response_format=Person, max_tokens=200,
                                         temperature=0.7, seed=1)
    person = done.choices[0].message.parsed
    assert isinstance(person, Person) and done.choices[0].finish_reason == "stop"
    assert json.loads(done.choices[0].message.content) == person.model_dump()


def test_tool_calls_forced_named_streamed_and_parsed(server):
    client = server.client()
    forced = client.chat.completions.create(model="pydoc", messages=USER, tools=[WEATHER, CLOCK],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                            temperature=0)
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]["function"]["parameters"]
    validate(json.loads(call.function.arguments), schema)
    streamed = list(client.chat.completions.create(model="pydoc", messages=USER, tools=[WEATHER, CLOCK],
                                                   tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                                   temperature=0, stream=True))
    deltas = [d for c in streamed for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(call.function.name, call.function.arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    named = client.chat.completions.create(model="pydoc", messages=USER, tools=[WEATHER, CLOCK], max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0.7, seed=3)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    none = client.chat.completions.create(model="pydoc", messages=USER, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_openai_parse_of_a_pydantic_function_tool(server):
    class Lookup(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=16)
        days: int = pydantic.Field(ge=1, le=7)

    client = server.client()
    done = client.chat.completions.parse(model="pydoc", messages=USER, tools=[openai.pydantic_function_tool(Lookup)],
                                         tool_choice="required", max_tokens=120, temperature=0.7, seed=2)
    parsed = [c.function.parsed_arguments for c in done.choices[0].message.tool_calls]
    assert parsed and all(isinstance(p, Lookup) for p in parsed)


def test_auto_tool_choice_gives_text_or_well_formed_calls(server):
    client = server.client()
    for seed in range(3):
        got = client.chat.completions.create(model="pydoc", messages=USER, tools=[WEATHER], max_tokens=60,
                                             temperature=1.0, seed=seed)
        message = got.choices[0].message
        if message.tool_calls:
            assert got.choices[0].finish_reason == "tool_calls"
            validate(json.loads(message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
        else:
            assert not (message.content or "").lstrip().startswith("[")  # a started call would be forced whole


def test_a_budget_too_small_ends_with_length_and_says_so(server):
    got = server.client().completions.create(model="pydoc", prompt="x", max_tokens=5, temperature=0,
                                             extra_body={"response_format": json_schema_format(PERSON)})
    assert got.choices[0].finish_reason == "length" and got.choices[0].model_extra["structured_output"] == "incomplete"


@pytest.mark.parametrize("extra, param, fragment", [
    ({"response_format": json_schema_format({"type": "object", "not": {}})}, "response_format.json_schema.schema",
     'Unimplemented keys: ["not"]'),
    ({"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs.regex", "look-around"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"json": {"enum": ["x" * 70000]}}}, "structured_outputs.json",
     "exceeds the limit of 65536 bytes"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex",
     "response_format and structured_outputs each constrain"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "names function 'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
     "tools[0].function.parameters", 'Unimplemented keys: ["not"]'),
])
def test_bad_specs_are_400_naming_the_field(server, extra, param, fragment):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": "pydoc", "messages": USER, "max_tokens": 8, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"] and "\n" not in error["message"]


def test_metrics_count_compiles_cache_hits_masks_and_outcomes(server):
    client = server.client()
    schema = {"type": "object", "properties": {"metric": {"enum": ["a", "b"]}}, "required": ["metric"],
              "additionalProperties": False}
    before = server.metrics()
    for _ in range(2):
        client.completions.create(model="pydoc", prompt="m", max_tokens=100, temperature=0,
                                  extra_body={"response_format": json_schema_format(schema)})
    after = server.metrics()

    def grew(name, labels=""):
        key = next(k for k in after if k.split("{")[0] == name and labels in k)
        return after[key] - before.get(key, 0)

    assert grew("luffy:structured_output_compile_seconds_count") == 1  # the second request found it compiled
    assert grew("luffy:structured_output_cache_hits_total") == 1
    assert grew("luffy:structured_output_masked_rows_total") >= 2 and grew("luffy:structured_output_mask_seconds_count") >= 2
    assert grew("luffy:structured_output_requests_total", 'structured_output="complete"') == 2


def test_a_tokenizer_llguidance_refuses_turns_off_structured_outputs_not_the_model(tmp_path):
    """An end-of-text id past the tokenizer's own vocabulary (as in checkpoints whose tokenizer.json is smaller than
    the model's embedding table) is one llguidance refuses: the server loads and serves plain requests, and a
    constrained one gets a 400 naming why."""
    make_hf_dir("llama", dict(NAMED_FAMILIES["llama"], eos_token_id=300), tmp_path / "hf")
    artifact = luffy.compile(tmp_path / "hf", output=tmp_path / "art", check_parity=False)
    with ServerProcess(artifact.path, "--served-model-name", "odd") as running:
        assert any("structured outputs unavailable" in line and "llguidance" in line for line in running.log)
        plain = httpx.post(f"{running.url}/v1/completions", timeout=60,
                           json={"model": "odd", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 4
        constrained = httpx.post(f"{running.url}/v1/completions", timeout=60,
                                 json={"model": "odd", "prompt": [1, 2, 3], "max_tokens": 4,
                                       "structured_outputs": {"regex": "[0-9]+"}})
        error = constrained.json()["error"]
        assert constrained.status_code == 400 and error["param"] == "structured_outputs.regex"
        assert "structured outputs are unavailable for this model" in error["message"] and "EOS" in error["message"]
