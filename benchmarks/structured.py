"""Structured outputs: the JSON-schema corpus run (correctness) and constrained-vs-free throughput, against a real
`luffy serve` process driven by OpenAI's client.

    python -m luffy.benchmarks.structured corpus ARTIFACT [--seeds 3] [--json out.json]
    python -m luffy.benchmarks.structured throughput ARTIFACT [--requests 16] [--rounds 3]

corpus: every schema of structured_schemas.json (60 API-style schemas: nested objects, bounded arrays, enums,
patterns, nullable fields, anyOf, $ref, formats) as ``response_format`` json_schema with ``strict``, at
temperature 0.7 and the largest max_tokens the artifact's context leaves after the prompt (512 when it allows);
on a model whose free output is noise (llama-tiny's random weights) every output must parse, validate (jsonschema,
with its format checker) and end with finish_reason "stop". A correctness run: timing does not matter.

throughput: ``--requests`` concurrent requests constrained by corpus schemas, then the same requests free
(``ignore_eos``, max_tokens set to what each constrained one produced), alternated over ``--rounds``; reports
generated tokens per second of each and their ratio (the target: constrained >= 0.9x free). Timing: run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS_FILE = Path(__file__).with_name("structured_schemas.json")


def corpus() -> list[dict]:
    """The schema corpus: ``{"name", "covers", "schema"}`` entries."""
    return json.loads(CORPUS_FILE.read_text())


def schemas() -> dict[str, dict]:
    """The corpus as name -> schema."""
    return {entry["name"]: entry["schema"] for entry in corpus()}


def validate(value, schema: dict) -> None:
    """Raise jsonschema's ValidationError unless ``value`` follows ``schema``, formats included (the checker of
    the schema's own draft: jsonschema's draft-3 ``time`` check would refuse fractional seconds)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)
    validator(schema, format_checker=validator.FORMAT_CHECKER).validate(value)
