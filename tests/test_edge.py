"""The serving edge against a real `luffy serve` process (llama-pydoc, as test_serving.py): one request fails
alone, every error is OpenAI's shape and counted, /openapi.json tells the truth, and a fuzzer's malformed and
extreme requests (benchmarks/fuzz_requests.py, seeded) never get a 5xx nor touch the requests served beside them.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import signal
import socket
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install 'luffy[serve]') is not installed")

from luffy.benchmarks.fuzz_requests import FuzzRequest, fuzz_request, send  # noqa: E402

from .server_process import ServerProcess  # noqa: E402
from .test_serving import PROMPTS, alone  # noqa: E402

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(pydoc):
    with ServerProcess(pydoc.path, "--max-num-seqs", "6", "--max-num-batched-tokens", "32", "--served-model-name",
                       "pydoc", "--header-timeout", "1", "--body-timeout", "1") as running:
        yield running


def _stream(server, body: dict) -> tuple[str, list[str]]:
    """(text, the raw data lines) of one streamed completion."""
    lines = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"model": "pydoc", "stream": True, **body},
                      timeout=120) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines if line != "[DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")), lines


def _is_openai_error(response: httpx.Response) -> bool:
    try:
        return set(response.json()["error"]) == ERROR_KEYS
    except (ValueError, KeyError, TypeError):
        return False


# The requests that each used to end every stream in flight, and other bad ones: each is a 400 alone.
BAD = [
    ({"stop_token_ids": [1e20]}, "stop_token_ids.0"),
    ({"stop_token_ids": [320], "min_tokens": 2, "max_tokens": 4}, "stop_token_ids"),  # llama-pydoc: vocab 320
    ({"seed": 2**64}, "seed"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"stream": 0}, "stream"),
    ({"prompt": [1, 2, 320]}, "prompt"),
    ({"max_tokens": 10**30}, None),
]


def test_bad_requests_beside_live_streams_leave_them_identical(server, engine):
    """Streams (greedy, seeded, and "seed": -1, which OpenAI's signed range allows) run while the requests that
    used to take them down are fired beside them: every bad one gets its 400, every stream ends with [DONE] and
    the tokens it gets alone."""
    good = [({"prompt": PROMPTS[i], "max_tokens": 40, "temperature": 0, "ignore_eos": True}, {}) for i in range(3)]
    good += [({"prompt": "The module", "max_tokens": 30, "temperature": 0.9, "seed": seed, "ignore_eos": True},
              {"do_sample": True, "temperature": 0.9, "seed": seed % 2**64}) for seed in (7, -1)]

    def bad_round(_):
        time.sleep(0.05)
        return [httpx.post(f"{server.url}/v1/completions", json={"model": "pydoc", "prompt": "x", **body},
                           timeout=60) for body, _ in BAD]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, server, body) for body, _ in good]
        refused = [r for batch in pool.map(bad_round, range(3)) for r in batch]
        results = [s.result() for s in streams]
    for response, (_, param) in zip(refused, BAD * 3):
        assert response.status_code == 400 and _is_openai_error(response), response.text
        assert response.json()["error"]["param"] == param
    for (text, lines), (body, kwargs) in zip(results, good):
        assert lines[-1] == "[DONE]"
        assert text == alone(engine, body["prompt"], body["max_tokens"], eos_token_id=None, **kwargs)[0]


def _raw(server, payload: bytes, read: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; returns what the server answered within ``read`` seconds."""
    host, port = server.url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=read) as sock:
        sock.sendall(payload)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except socket.timeout:
            pass
    return answer


@pytest.mark.parametrize("request_, status, fragment", [
    (FuzzRequest("route", "GET", "/v1/nope"), 404, "no route GET /v1/nope"),
    (FuzzRequest("method", "GET", "/v1/completions"), 405, "GET is not allowed on /v1/completions"),
    (FuzzRequest("missing", "POST", "/v1/completions", b'{"model": "pydoc"}'), 400, "prompt: Field required"),
    (FuzzRequest("utf8", "POST", "/v1/completions", b'{"model": "pydoc", "prompt": "\xff"}'), 400, "not UTF-8"),
    (FuzzRequest("surrogate", "POST", "/v1/chat/completions",
                 b'{"model": "pydoc", "messages": [{"role": "user", "content": "\\ud800"}]}'), 400,
     "messages.0.content: a lone UTF-16 surrogate"),
    (FuzzRequest("nan", "POST", "/v1/completions", b'{"model": "pydoc", "prompt": "x", "temperature": NaN}'), 400,
     "NaN is not a JSON number"),
    (FuzzRequest("chunked", "POST", "/v1/completions", chunks=[b'{"prompt": "' + b"x" * 65536] * 20), 413,
     "request body over 1048576 bytes"),
])
def test_every_error_is_openai_shaped_declared_and_counted(server, request_, status, fragment):
    before = server.metrics()
    with httpx.Client(timeout=30) as client:
        response = send(client, server.url, request_)
    assert response.status_code == status and _is_openai_error(response), response.text
    assert fragment in response.json()["error"]["message"]
    key = f'luffy:http_errors_total{{model_name="pydoc",status="{status}"}}'
    assert server.metrics()[key] == before.get(key, 0) + 1


def test_slow_headers_and_bodies_get_408(server):
    """--header-timeout 1 / --body-timeout 1: a client that sends part of its headers, or of its body, and stops
    is answered 408 in OpenAI's shape and its connection closed (uvicorn alone would wait forever)."""
    before = server.metrics().get('luffy:http_errors_total{model_name="pydoc",status="408"}', 0)
    headers_only = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    half_body = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": ")
    for answer, what in ((headers_only, "headers"), (half_body, "body")):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        error = json.loads(body)["error"]
        assert set(error) == ERROR_KEYS and f"the request {what} did not arrive within 1 s" in error["message"]
    assert server.metrics()['luffy:http_errors_total{model_name="pydoc",status="408"}'] == before + 2


def test_openapi_declares_what_the_server_does(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    paths = schema["paths"]
    assert "422" not in json.dumps(paths) and "HTTPValidationError" not in json.dumps(schema)
    declared = {(path, method): set(op["responses"]) for path, ops in paths.items() for method, op in ops.items()}
    assert declared[("/v1/completions", "post")] >= {"200", "400", "401", "404", "408", "413", "429", "500", "503"}
    assert set(paths["/v1/completions"]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                   "text/event-stream"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain; version=0.0.4; charset=utf-8"]
    error = paths["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    # the server accepts what it declares: every numeric bound of the completion request, at its limit
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    accepted = []
    for name, prop in props.items():
        forms = [prop, *prop.get("anyOf", [])]
        for key in ("minimum", "maximum"):
            number = next((p.get(key) for p in forms if key in p), None)
            if number is not None and name not in ("max_tokens", "max_completion_tokens"):
                integer = any(p.get("type") == "integer" for p in forms)  # FastAPI writes bounds as floats
                accepted.append((name, int(number) if integer else number))
        if any(p.get("format") == "int64" for p in forms):
            accepted += [(name, -(2**63)), (name, 2**63 - 1)]
    assert {"temperature", "top_p", "seed", "top_k", "min_tokens"} <= {name for name, _ in accepted}
    for name, number in accepted:
        body = {"model": "pydoc", "prompt": "x", "max_tokens": 2, name: number}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, (name, number, response.text)
    # the model's own limits, declared once it is loaded: token ids below the vocabulary, max_tokens in the context
    stop_ids = next(f for f in props["stop_token_ids"]["anyOf"] if f.get("type") == "array")["items"]
    max_tokens = next(f for f in props["max_tokens"]["anyOf"] if f.get("type") == "integer")
    assert (stop_ids["minimum"], stop_ids["maximum"], max_tokens["maximum"]) == (0, 319, 1023)
    for body, status in (({"stop_token_ids": [319]}, 200), ({"stop_token_ids": [320]}, 400),
                         ({"prompt": [1], "max_tokens": 1024}, 400)):
        response = httpx.post(f"{server.url}/v1/completions", json={"model": "pydoc", "prompt": "x", "max_tokens": 2,
                                                                    **body}, timeout=30)
        assert response.status_code == status, (body, response.text)


def test_the_fuzzer_gets_no_5xx_and_damages_no_stream(server, engine):
    """Seeded malformed and extreme requests (two clients) beside two long streams: every answer is below 500
    and declared by /openapi.json (an error in OpenAI's shape unless 200), the streams keep the tokens they get
    alone, the process lives, and its memory stays flat from the first 60 requests to the last."""
    declared = {path: {m.upper(): set(map(int, op["responses"])) for m, op in ops.items()}
                for path, ops in httpx.get(f"{server.url}/openapi.json").json()["paths"].items()}
    rng = random.Random(0)
    requests = [fuzz_request(rng, "pydoc", 320) for _ in range(240)]
    answers = []

    def fuzz(part):
        with httpx.Client(timeout=60) as client:
            return [(r, send(client, server.url, r)) for r in part]

    good = {"prompt": "Return the", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(_stream, server, good) for _ in range(2)]
        answers += [a for part in pool.map(fuzz, [requests[0:60:2], requests[1:60:2]]) for a in part]
        rss_warm = server.rss_bytes()
        answers += [a for part in pool.map(fuzz, [requests[60::2], requests[61::2]]) for a in part]
        results = [s.result() for s in streams]
    for request, response in answers:
        assert response.status_code < 500, (request.kind, request.body[:200], response.text)
        if response.status_code != 200:
            assert _is_openai_error(response), (request.kind, response.text)
            route = declared.get(request.path, {}).get(request.method)
            assert route is None or response.status_code in route, (request.kind, response.status_code)
    statuses = {response.status_code for _, response in answers}
    assert {200, 400, 404, 405, 413} <= statuses
    expected = alone(engine, "Return the", 200, eos_token_id=None)[0]
    assert all(text == expected and lines[-1] == "[DONE]" for text, lines in results)
    assert server.proc.poll() is None and server.rss_bytes() <= rss_warm * 1.05


def test_drain_expiry_ends_streams_with_an_error_event_and_done(pydoc):
    """--drain-timeout 0.2 with a stream of 900 tokens in flight: SIGTERM, and 0.2 s later the stream ends with
    an error event naming the drain timeout, then [DONE]; the server exits 0. (900 tokens of llama-pydoc take
    ~1 s on an idle 2-core machine: a 1 s drain raced them.)"""
    server = ServerProcess(pydoc.path, "--drain-timeout", "0.2").__enter__()
    try:
        body = {"model": pydoc.path.name, "prompt": "Return the", "max_tokens": 900, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert set(error) == ERROR_KEYS and "--drain-timeout 0.2 s" in error["message"]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_time_per_output_token_metrics(server):
    httpx.post(f"{server.url}/v1/completions", timeout=60,
               json={"model": "pydoc", "prompt": "Open the", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    samples = {k.split("{")[0]: v for k, v in server.metrics().items()}
    assert samples["luffy:request_time_per_output_token_seconds_count"] >= 1
    assert samples["luffy:time_per_output_token_seconds_count"] == samples["luffy:inter_token_latency_seconds_count"]
    assert samples["luffy:time_per_output_token_seconds_sum"] == samples["luffy:inter_token_latency_seconds_sum"]
