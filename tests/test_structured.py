"""Structured outputs: llguidance grammars, their cache and limits, the per-request constraint, the JSON closing
rule, and the tool-call formats. Grammars run on the zoo's real byte tokenizer (tokenizer.json text, as an
artifact carries it); the model-level runs are in test_structured_generate.py."""

import json
import re

import llguidance
import numpy as np
import pytest

from luffy.errors import UsageError
from luffy.models_zoo import ZOO, build_tokenizer
from luffy.models_zoo.byte_tokenizer import EOS_ID
from luffy.runtimes.constraint import BatchMasker, fill_bitmasks
from luffy.runtimes.json_closing import MARGIN, unpack, words
from luffy.runtimes.grammar import DATE_PATTERNS, GrammarCompiler, GrammarError, GrammarLimits, GrammarSpec
from luffy.serving import tools

VOCAB = 320


def compiler(**limits) -> GrammarCompiler:
    text = build_tokenizer(ZOO["llama-tiny"]).to_str()
    return GrammarCompiler(text, VOCAB, [EOS_ID], GrammarLimits(**limits) if limits else None)


@pytest.fixture(scope="module")
def grammars():
    return compiler()


def encode(text: str) -> list[int]:
    return list(text.encode())  # the byte tokenizer: token id = byte


def allowed(constraint) -> np.ndarray:
    logits = np.zeros(VOCAB, dtype=np.float32)
    constraint.mask(logits)
    return np.flatnonzero(np.isfinite(logits))


def drive(grammars, spec: GrammarSpec, max_tokens: int, favour: int | None = None, seed: int = 0) -> tuple[str, object]:
    """Decode ``spec`` from random logits (``favour``: one token far above the rest); returns (text, constraint)."""
    constraint = grammars.constraint(grammars.compile(spec), max_tokens)
    rng, out = np.random.default_rng(seed), []
    for _ in range(max_tokens):
        logits = rng.normal(size=VOCAB).astype(np.float32)
        if favour is not None:
            logits[favour] += 50.0
        constraint.mask(logits)
        token = int(np.argmax(logits))
        constraint.accept(token)
        if token == EOS_ID:
            break
        out.append(token)
        if constraint.is_finished():
            break
    return bytes(out).decode(), constraint


@pytest.mark.parametrize("kind, spec, named", [
    ("json_schema", {"type": "object", "not": {"type": "string"}}, 'Unimplemented keys: ["not"]'),
    ("json_schema", {"oneOf": [{"type": "object"}, {"type": "object", "properties": {"a": {}}}]}, "oneOf"),
    ("json_schema", {"type": "string", "format": "credit-card"}, "Unknown format: credit-card"),
    ("json_schema", {"$ref": "#/$defs/missing"}, "/$defs/missing"),
    ("json_schema", "{not json", "not valid JSON"),
    ("regex", r"(?<=a)b", "look-around"),
    ("regex", "(a", "unclosed group"),
    ("grammar", "start: undefined_rule", 'unknown name: "undefined_rule"'),
    ("choice", [], "non-empty list"),
    ("xml", "<a/>", "unknown structured output kind 'xml'"),
])
def test_a_refused_spec_names_its_construct_in_one_line(grammars, kind, spec, named):
    with pytest.raises(GrammarError) as error:
        grammars.compile(GrammarSpec(kind, spec))
    assert named in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(kind if kind != "xml" else "unknown")


def test_limits_on_spec_size_and_compile_time():
    with pytest.raises(GrammarError, match=r"json_schema of \d+ bytes exceeds the limit of 100 bytes"):
        compiler(max_spec_bytes=100).compile(GrammarSpec("json_schema", {"enum": ["x" * 100]}))
    slow = compiler(compile_timeout=0.05, max_spec_bytes=1 << 20)
    many = {f"p{i}": {"type": "string", "pattern": "^[a-z]{3}[0-9]{2}$"} for i in range(2000)}  # ~1 s to compile
    with pytest.raises(GrammarError, match=r"json_schema: compiling took longer than the limit of 0.05 s"):
        slow.compile(GrammarSpec("json_schema", {"type": "object", "properties": many}))


def test_grammars_compile_once_and_the_cache_is_bounded():
    grammars, heard = compiler(cache_size=2), []
    grammars.listener = lambda seconds, hit: heard.append((seconds, hit))
    a, b, c = (GrammarSpec("regex", r) for r in ("[0-9]+", "[a-z]+", "x|y"))
    first = grammars.compile(a)
    assert grammars.compile(GrammarSpec("regex", "[0-9]+")) is first  # equal specs share one compile
    assert heard[0][0] > 0 and not heard[0][1] and heard[1] == (0.0, True)
    grammars.compile(b), grammars.compile(c)  # a is now the least recently used of three: evicted
    assert grammars.compile(a) is not first and heard[-1][1] is False
    assert list(allowed(grammars.constraint(first, 8))) == list(allowed(grammars.constraint(grammars.compile(a), 8)))


def test_the_constraint_masks_advances_rolls_back_and_finishes(grammars):
    constraint = grammars.constraint(grammars.compile(GrammarSpec("regex", "[0-9]{2}-(yes|no)")), 16)
    digits = list(encode("0123456789"))
    assert list(allowed(constraint)) == digits
    constraint.accept(ord("4"))
    after_one = list(allowed(constraint))
    constraint.accept(ord("2"))
    assert list(allowed(constraint)) == [ord("-")]
    constraint.rollback(1)
    assert list(allowed(constraint)) == after_one == digits
    with pytest.raises(UsageError, match="not allowed by the grammar"):
        constraint.accept(ord("x"))
    with pytest.raises(UsageError, match="cannot roll back 5 tokens"):
        grammars.constraint(grammars.compile(GrammarSpec("regex", "a")), 4).rollback(5)
    fresh = grammars.constraint(grammars.compile(GrammarSpec("choice", ["yes", "no"])), 8)
    for token in encode("no"):
        assert not fresh.is_finished()
        fresh.accept(token)
    assert fresh.is_finished() and fresh.complete and list(allowed(fresh)) == [EOS_ID]


def test_one_batched_fill_equals_each_constraint_alone(grammars):
    specs = [GrammarSpec("regex", "[a-c]+z"), GrammarSpec("json_schema", {"type": "array", "items": {"type": "integer"}}),
             GrammarSpec("choice", ["alpha", "beta"])]
    constraints = [grammars.constraint(grammars.compile(s), 32) for s in specs]
    for constraint, prefix in zip(constraints, ["ab", "[1,", "al"]):
        for token in encode(prefix):
            constraint.accept(token)
    alone = [list(allowed(c)) for c in constraints]
    bitmask = np.zeros((3, words(VOCAB)), dtype=np.int32)
    fill_bitmasks(llguidance.LLExecutor(2), constraints, bitmask)
    assert [list(np.flatnonzero(unpack(row, VOCAB))) for row in bitmask] == alone
    for constraint in constraints:
        constraint.row[:] = 0  # what a fill writes is what mask() applies next
    BatchMasker(None).fill(constraints)
    assert [list(allowed(c)) for c in constraints] == alone


def test_dates_and_times_are_the_ones_rfc3339_validators_take(grammars):
    good = {"date": ["2024-02-29", "2000-02-29", "0004-02-29", "2023-12-31", "0001-01-01"],
            "time": ["23:59:59Z", "00:00:00.5+05:30", "12:01:02z"],
            "date-time": ["2024-02-29T23:59:59.123Z", "1999-12-31t00:00:00-08:00"]}
    bad = {"date": ["2023-02-29", "1900-02-29", "2023-04-31", "0000-01-01", "2023-13-01"],
           "time": ["12:01:60Z", "24:00:00Z", "12:00:00"],
           "date-time": ["2023-02-29T00:00:00Z", "2024-01-01T23:59:60Z", "2024-01-01 00:00:00Z"]}
    for fmt, pattern in DATE_PATTERNS.items():
        assert all(re.fullmatch(pattern, s) for s in good[fmt]), fmt
        assert not any(re.fullmatch(pattern, s) for s in bad[fmt]), fmt
    compiled = grammars.compile(GrammarSpec("json_schema", {"type": "string", "format": "date"}))
    for text, whole in (('"2024-02-29"', True), ('"2023-02-29"', False)):
        constraint = grammars.constraint(compiled, 16)
        taken = constraint.matcher.try_consume_tokens(encode(text))
        assert (taken == len(text)) == whole


def test_json_closes_its_strings_when_the_budget_runs_short(grammars):
    """Logits that always favour "a" never close a string by themselves; once the tokens left fall to what
    closing takes, the constraint allows only the closing quote, so the output is whole JSON."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
        "type": "string"}}}, "required": ["name", "tags"]}
    spec = GrammarSpec("json_schema", schema, strict=True)
    budget = 2 * (2 * grammars.compile(spec).closing_need + MARGIN)  # the rule's second half of the budget
    text, constraint = drive(grammars, spec, budget, favour=ord("a"))
    value = json.loads(text)
    assert set(value) == {"name", "tags"} and value["name"].startswith("a" * (budget // 2 - 9)) and constraint.wrapped_up
    assert constraint.is_finished() and constraint.accepted <= budget
    regex_text, regex = drive(grammars, GrammarSpec("regex", "[a-z]+"), 20, favour=ord("a"))
    assert regex_text == "a" * 20 and not regex.wrapped_up and not regex.is_finished()  # only JSON is closed


def test_strict_json_is_compact_and_other_json_bounds_its_whitespace(grammars):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    strict = grammars.constraint(grammars.compile(GrammarSpec("json_schema", schema, strict=True)), 16)
    strict.accept(ord("{"))
    assert ord(" ") not in allowed(strict) and ord("\n") not in allowed(strict)
    loose = grammars.constraint(grammars.compile(GrammarSpec("json_object")), 64)
    loose.accept(ord("{"))
    for _ in range(32):
        loose.accept(ord(" "))
    assert ord(" ") not in allowed(loose) and ord('"') in allowed(loose)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}}, "required": ["zone"]}}}
TEMPLATES = {"hermes": "{% for t in tools %}{{ t }}{% endfor %}<tool_call>", "llama3_json": "<|python_tag|>{{ tools }}",
             "json": "{% for m in messages %}{{ m.content }}{% endfor %}"}


@pytest.mark.parametrize("fmt", sorted(TEMPLATES))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_call_is_well_formed_in_each_format(grammars, fmt, choice):
    plan = tools.plan([WEATHER, CLOCK], choice, True, TEMPLATES[fmt])
    assert plan.format == fmt and plan.forced
    for seed in range(2):
        text, constraint = drive(grammars, plan.grammar(), 160, seed=seed)
        content, calls = tools.parse(text, plan)
        assert constraint.is_finished() and content is None and calls, text
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            if call["function"]["name"] == "get_time":
                assert re.fullmatch("[A-Z][a-z]{1,8}", arguments["zone"])
            else:
                assert choice == "required" and arguments["unit"] in ("C", "F")


def test_auto_allows_text_and_forces_a_started_call(grammars):
    plan = tools.plan([WEATHER, CLOCK], "auto", False, TEMPLATES["hermes"])
    constraint = grammars.constraint(grammars.compile(plan.grammar()), 200)
    for token in encode("Let me check. <tool_call>\n"):
        constraint.accept(token)
    assert list(allowed(constraint)) == [ord("{")]
    for token in encode('{"name": "get_time", "arguments": {"zone": "Rome"}}\n</tool_call>'):
        constraint.accept(token)
    content, calls = tools.parse('Let me check. <tool_call>\n{"name": "get_time", "arguments": {"zone": "Rome"}}\n'
                                 "</tool_call>", plan)
    assert content == "Let me check." and calls[0]["function"] == {"name": "get_time", "arguments": '{"zone": "Rome"}'}
    json_plan = tools.plan([WEATHER], "auto", True, TEMPLATES["json"])
    assert tools.parse("It is sunny.", json_plan) == ("It is sunny.", [])
    assert tools.parse('[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]',
                       json_plan)[1][0]["function"]["name"] == "get_weather"
    llama = tools.plan([WEATHER, CLOCK], "auto", True, TEMPLATES["llama3_json"])
    two = '{"name": "get_time", "parameters": {"zone": "Rome"}}; {"name": "get_time", "parameters": {"zone": "Oslo"}}'
    assert [json.loads(c["function"]["arguments"])["zone"] for c in tools.parse(two, llama)[1]] == ["Rome", "Oslo"]
    assert tools.parse('{"name": "get_time", "parameters": {"zo', llama) == ('{"name": "get_time", "parameters": {"zo',
                                                                            [])  # cut off: stays text


@pytest.mark.parametrize("tool_list, choice, param, message", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "names function 'nope'"),
    ([WEATHER], "sometimes", "tool_choice", "expected none, auto, required"),
    ([], "required", "tool_choice", "tool_choice needs tools"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "tools[0]", "1-64 letters"),
    ([WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}], "auto",
     "tools[1].function.parameters", 'Unimplemented keys: ["not"]'),
])
def test_bad_tools_name_the_field(tool_list, choice, param, message):
    with pytest.raises(tools.ToolError, match=re.escape(message)) as error:
        tools.plan(tool_list, choice, True, None)
    assert error.value.param == param
    assert tools.plan([WEATHER], "none", True, None) is None


def test_a_streamed_hermes_output_holds_back_only_what_may_start_a_call():
    from luffy.serving.structured import ToolCallStream

    plan = tools.plan([WEATHER, CLOCK], "auto", True, TEMPLATES["hermes"])
    text = ('Let me <b>check</b>. <tool_call>\n{"name": "get_time", "arguments": {"zone": "Rome"}}\n</tool_call>'
            "<tool_call>\n" '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call> ok <tool')
    split, released = ToolCallStream(plan), []
    for at, char in enumerate(text):  # one character at a time, as the detokenizer may release it
        for delta in split.feed(char):
            released.append((at, delta))
    released += [(len(text), delta) for delta in split.finish()]
    content = "".join(d.get("content", "") for _, d in released)
    calls = [(at, d["tool_calls"][0]) for at, d in released if "tool_calls" in d]
    assert content == "Let me <b>check</b>.  ok <tool"
    assert [c["index"] for _, c in calls] == [0, 1] and calls[0][1]["function"]["name"] == "get_time"
    assert json.loads(calls[1][1]["function"]["arguments"]) == {"city": "Oslo", "unit": "C"}
    assert calls[0][0] == text.index("</tool_call>") + len("</tool_call>") - 1  # out as soon as the call closes
    assert next(at for at, d in released if d.get("content", "").startswith("<b")) < text.index("check")
