"""Structured outputs on a real model: Engine.generate with json_schema / regex / choice / grammar on llama-tiny,
whose random weights make its free output noise. A subset of the schema corpus of benchmarks/structured.py runs
here (the whole corpus: ``python -m luffy.benchmarks.structured``)."""

import json
import re
import warnings

import pytest

from luffy.benchmarks.structured import corpus, schemas, validate
from luffy.errors import UsageError

SUBSET = ("order", "calendar_event", "employee_tree", "json_patch", "payment_method", "nullable_types",
          "free_text_fields", "pydantic_style", "geo_polygon", "top_level_enum")


@pytest.fixture(scope="module")
def tiny(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    return artifact.load()


def new_text(engine, row, start: int) -> str:
    return engine.tokenizer.decode([int(t) for t in row[start:]], skip_special_tokens=True)


@pytest.mark.parametrize("name", SUBSET)
def test_corpus_schemas_parse_and_validate_at_temperature_0_7(tiny, name):
    schema = schemas()[name]
    prompt = tiny.tokenizer.encode("JSON:").ids
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a grammar cut off by the budget warns: fail on it
        out = tiny.generate([prompt], tiny.max_seq_len - len(prompt), json_schema=schema, do_sample=True,
                            temperature=0.7, seed=0)
    validate(json.loads(new_text(tiny, out[0], len(prompt))), schema)


def test_regex_choice_and_grammar(tiny):
    prompts = [tiny.tokenizer.encode(p).ids for p in ("a", "longer prompt")]
    codes = tiny.generate(prompts, 16, regex=r"[A-Z]{3}-[0-9]{4}", do_sample=True, seed=3)
    assert all(re.fullmatch(r"[A-Z]{3}-[0-9]{4}", new_text(tiny, row, len(prompts[1]))) for row in codes)
    assert tiny.generate_text(["x", "yz"], max_new_tokens=8, choice=["north", "south", "east"]) in (
        [a, b] for a in ("north", "south", "east") for b in ("north", "south", "east"))
    lark = 'start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/'
    text = tiny.generate_text("sum:", max_new_tokens=40, grammar=lark, do_sample=True, temperature=0.7, seed=1)
    assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", text), text


def test_each_row_gets_what_it_would_get_alone(tiny):
    """Greedy, ragged rows: the grammar state is per row, so batching changes nothing."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 8}},
              "required": ["a", "b"]}
    prompts = [tiny.tokenizer.encode(p).ids for p in ("one", "a longer second prompt", "3")]
    together = tiny.generate(prompts, 48, json_schema=schema)
    width = max(len(p) for p in prompts)
    for prompt, row in zip(prompts, together):
        alone = tiny.generate([prompt], 48, json_schema=schema)[0]
        assert new_text(tiny, alone, len(prompt)) == new_text(tiny, row, width)
        json.loads(new_text(tiny, row, width))


def test_a_budget_too_small_warns_and_bad_arguments_are_refused(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny.generate_text("x", max_new_tokens=4, json_schema={"type": "object", "properties": {"name": {
            "type": "string"}}, "required": ["name"]})
    assert any("ran out before the grammar was complete" in str(w.message) for w in caught)
    with pytest.raises(UsageError, match="give one of json_schema, regex, grammar, choice or constraint; got regex, choice"):
        tiny.generate([[256, 1]], 4, regex="a", choice=["a"])
    with pytest.raises(UsageError, match=r'json_schema: Unimplemented keys: \["not"\]'):
        tiny.generate([[256, 1]], 4, json_schema={"not": {}})


def test_the_corpus_is_large_and_covers_the_kinds_apis_use():
    covered = {kind for entry in corpus() for kind in entry["covers"]}
    assert len(schemas()) == len(corpus()) >= 50
    assert {"nested object", "bounded array", "enum", "pattern", "nullable (type list)", "anyOf", "$ref",
            "recursive $ref"} <= covered


@pytest.fixture(scope="module")
def pydoc(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-pydoc")
    return artifact.load()


def test_drafts_are_checked_against_the_grammar(pydoc):
    """Prompt lookup proposes tokens the grammar often refuses; greedy output equals plain constrained greedy."""
    prompt = pydoc.tokenizer.encode('JSON like {"name": "Ada", "age": 36} or {"name": "Bob", "age": 7}: ').ids
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False}
    for grammar in ({"json_schema": schema}, {"regex": "(ab|cd)+"}):
        plain = pydoc.generate([prompt], 40, **grammar)
        assert (pydoc.generate([prompt], 40, prompt_lookup_num_tokens=4, **grammar) == plain).all()
        assert pydoc.generation_stats["draft_tokens"] > 0
