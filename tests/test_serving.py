"""`luffy serve` as clients use it: a real server process on 127.0.0.1, driven by OpenAI's own client and httpx.

The model is llama-pydoc (trained weights, so greedy continuations are text, not noise). The contract: a
served request's tokens equal ``Engine.generate`` of that request alone, whatever else shares the batch.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install 'luffy[serve]') is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from .server_process import ServerProcess  # noqa: E402

KEY = "test-key-123"
PROMPTS = ["def parse(", "Return the", "class Foo:\n    \"\"\"", "import os\n", "The module", "Raise a",
           "If the file", "Open the", "Create a new", "This function", "Return a list of", "Set the",
           "Get the value", "The default is", "Read data from", "Write the"]


@pytest.fixture(scope="module")
def server(pydoc):
    with ServerProcess(pydoc.path, "--max-num-seqs", "8", "--max-num-batched-tokens", "24",
                       "--served-model-name", "pydoc", api_key=KEY) as running:
        yield running


def alone(engine, prompt, max_tokens, **kwargs) -> tuple[str, int]:
    """(text, completion tokens) of Engine.generate on this prompt alone, as the server tokenizes it."""
    ids = engine.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
    out = engine.generate([ids], max_new_tokens=max_tokens, **kwargs)[0, len(ids):].tolist()
    return engine.tokenizer.decode(out, skip_special_tokens=True), len(out)


def test_completion_and_its_stream_equal_generate_alone(server, engine):
    client = server.client()
    text, tokens = alone(engine, "Return the", 40)
    got = client.completions.create(model="pydoc", prompt="Return the", max_tokens=40, temperature=0)
    assert got.choices[0].text == text and got.choices[0].finish_reason in ("length", "stop")
    prompt_tokens = len(engine.tokenizer.encode("Return the").ids)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        prompt_tokens, tokens, prompt_tokens + tokens)
    chunks = list(client.completions.create(model="pydoc", prompt="Return the", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason


def test_token_id_prompts_and_stop_parameters(server, engine):
    client = server.client()
    ids = [256] + list(b"Open the")
    text, _ = alone(engine, ids, 30, eos_token_id=None)
    got = client.completions.create(model="pydoc", prompt=ids, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == text and got.usage.completion_tokens == 30
    stop = text[10:13]
    cut = client.completions.create(model="pydoc", prompt=ids, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="pydoc", prompt=ids, max_tokens=30, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.choices[0].text  # a stop string split across tokens never leaks into the stream


def test_sixteen_staggered_concurrent_requests_each_equal_generate_alone(server, engine):
    client = server.client()
    expected = [alone(engine, p, 24, eos_token_id=None)[0] for p in PROMPTS]

    def one(i):
        time.sleep(0.03 * i)  # arrivals spread over the others' decoding and prefill chunks
        got = client.completions.create(model="pydoc", prompt=PROMPTS[i], max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
        return got.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == expected


def test_seeded_sampling_is_reproducible_and_equals_generate(server, engine):
    client = server.client()
    kwargs = dict(model="pydoc", prompt="The module", max_tokens=20, temperature=0.8, top_p=0.9, seed=7,
                  extra_body={"ignore_eos": True})
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    text, _ = alone(engine, "The module", 20, do_sample=True, temperature=0.8, top_p=0.9, seed=7, eos_token_id=None)
    assert first == second == text


def test_chat_applies_the_artifacts_template(server, engine):
    client = server.client()
    messages = [{"role": "system", "content": "Utilities for files."}, {"role": "user", "content": "Return the"}]
    rendered = "<bos>Utilities for files.\nReturn the\n"  # llama-pydoc's template (models_zoo/trained.py)
    ids = engine.tokenizer.encode(rendered, add_special_tokens=False).ids
    text, _ = alone(engine, ids, 16, eos_token_id=None)
    got = client.chat.completions.create(model="pydoc", messages=messages, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == text
    assert got.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="pydoc", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_models_health_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["pydoc"]
    # one finished request of its own: the labelled counters (request_success_total) appear with their first use
    server.client().completions.create(model="pydoc", prompt="def", max_tokens=2, temperature=0)
    names = {key.split("{")[0] for key in server.metrics()}
    assert {"luffy:time_to_first_token_seconds_count", "luffy:inter_token_latency_seconds_count",
            "luffy:e2e_request_latency_seconds_count", "luffy:request_queue_time_seconds_count",
            "luffy:num_requests_running", "luffy:num_requests_waiting", "luffy:kv_cache_usage_perc",
            "luffy:prompt_tokens_total", "luffy:generation_tokens_total", "luffy:request_success_total"} <= names
    # a scrape refreshes the gauges; it is not a scheduler iteration
    assert _wait_for(lambda: server.metric("luffy:num_requests_running") == 0)
    iterations = server.metric("luffy:scheduler_iterations_total")
    assert [server.metric("luffy:scheduler_iterations_total") for _ in range(3)] == [iterations] * 3


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "x", "max_tokens": 5000}, 400, "exceeds the maximum context length 1024"),
    ({"prompt": [1, 320]}, 400, "token id 320 is outside the vocabulary of size 320"),
    ({"prompt": [1, -1]}, 400, "token id -1 is outside the vocabulary"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens=0 generates nothing"),
    ({"prompt": "x", "logit_bias": {"320": 5}}, 400, "logit_bias: token id 320 is outside the vocabulary"),
    ({"prompt": "x", "logit_bias": {"7": 101}}, 400, "logit_bias"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    ({"prompt": ["a", []]}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model 'gpt-4' does not exist"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    response = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json={"model": "pydoc", **body})
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_auth_and_body_limit(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{server.url}/v1/completions", headers=headers, json={"model": "pydoc", "prompt": "x"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # the one route without the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    big = {"model": "pydoc", "prompt": "x" * (2 << 20)}
    response = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json=big)
    assert response.status_code == 413 and "request body over" in response.json()["error"]["message"]


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_frees_its_slot(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=server.headers, timeout=30,
                      json={"model": "pydoc", "prompt": "Return the", "max_tokens": 900, "temperature": 0,
                            "stream": True, "ignore_eos": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metric("luffy:num_requests_running") == 1
    # the connection is closed mid-stream: the request is cancelled and its slot freed
    assert _wait_for(lambda: server.metric("luffy:num_requests_running") == 0)
    assert server.metric("luffy:kv_cache_usage_perc") == 0
    aborted = [v for k, v in server.metrics().items() if 'finished_reason="abort"' in k]
    assert aborted and aborted[0] >= 1
    # the same for a request that is not streamed: the client hangs up while it runs (a raw socket, closed once
    # the server counts the request running: a client timeout raced the request, which pydoc finishes in < 0.5 s)
    body = json.dumps({"model": "pydoc", "prompt": "Return the", "max_tokens": 1000, "temperature": 0,
                       "ignore_eos": True, "n": 4}).encode()
    url = httpx.URL(server.url)
    with socket.create_connection((url.host, url.port), timeout=10) as client:
        head = "".join(f"{k}: {v}\r\n" for k, v in {**server.headers, "Content-Type": "application/json",
                                                     "Content-Length": len(body)}.items())
        client.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {url.host}\r\n{head}\r\n".encode() + body)
        assert _wait_for(lambda: server.metric("luffy:num_requests_running") >= 1)
    assert _wait_for(lambda: server.metric("luffy:num_requests_running") == 0)
    assert [v for k, v in server.metrics().items() if 'finished_reason="abort"' in k][0] >= aborted[0] + 1


def test_queue_full_is_429_and_a_templateless_artifact_refuses_chat(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")  # random weights, no chat template
    with ServerProcess(artifact.path, "--max-num-seqs", "1", "--max-queue", "1") as server:
        # ten requests at once for one slot and one queue place: the first runs (300 tokens, hundreds of ms),
        # the second waits, and the rest arrive within milliseconds to a full queue
        body = {"model": artifact.path.name, "prompt": [256, 1], "max_tokens": 300, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/completions", json=body, timeout=60),
                                      range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in responses if r.status_code == 200)
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"model": artifact.path.name, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "has no chat template" in chat.json()["error"]["message"]


def test_sigterm_drains_running_requests_and_exits_0(pydoc):
    server = ServerProcess(pydoc.path, "--drain-timeout", "60").__enter__()
    try:
        body = {"model": pydoc.path.name, "prompt": "Return the", "max_tokens": 120, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            assert _wait_for(lambda: any("draining" in line for line in server.log), 10)
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503  # draining
            late = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # the running request finished in full
        chunks = [json.loads(line[6:]) for line in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_soak_with_cancellations_leaks_no_slot_and_bounds_memory(server):
    """500 requests, a third of them abandoned mid-stream; afterwards no slot is held and RSS is bounded."""
    rng = random.Random(0)
    url, headers = f"{server.url}/v1/completions", server.headers

    def one(i):
        body = {"model": "pydoc", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": rng.randint(2, 12),
                "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url, headers=headers, json=body, timeout=60) as response:
            for n, _ in enumerate(response.iter_lines()):
                if i % 3 == 0 and n == 2:
                    return "cancelled"  # leaving the block closes the connection mid-stream
        return "done"

    rss = {}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(100)))
        rss[100] = server.rss_bytes()
        outcomes += list(pool.map(one, range(100, 500)))
        rss[500] = server.rss_bytes()
    assert outcomes.count("done") >= 300
    assert _wait_for(lambda: server.metric("luffy:num_requests_running") == 0)
    assert server.metric("luffy:num_requests_waiting") == 0 and server.metric("luffy:kv_cache_usage_perc") == 0
    assert rss[500] <= rss[100] * 1.05, rss  # the bound: no growth with the request count
    np.testing.assert_equal(server.client().completions.create(model="pydoc", prompt="x", max_tokens=1).usage.
                            completion_tokens, 1)  # and it still serves


def test_health_is_503_while_loading_and_after_a_failed_load(pydoc, tmp_path):
    # The real app and routes in-process (httpx's ASGI transport), with the load run by the test, so the
    # loading window is not a race: 503 "loading" before it, 200 after, 503 naming the cause when it fails.
    import asyncio
    import shutil

    from fastapi import FastAPI

    from luffy.serving.routes import add_routes
    from luffy.serving.options import ServerSettings
    from luffy.serving.state import OutputRouter, ServingState

    broken = tmp_path / "broken"
    shutil.copytree(pydoc.path, broken)
    (broken / "model.onnx").write_bytes(b"\0" * 16)  # no longer matches its hash

    async def scenario():
        states = {name: ServingState(path, ServerSettings()) for name, path in (("ok", pydoc.path), ("bad", broken))}
        statuses = {}
        for name, state in states.items():
            state.router = OutputRouter(asyncio.get_running_loop())
            app = FastAPI()
            add_routes(app, state)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://luffy") as client:
                before = await client.get("/health")
                completion = await client.post("/v1/completions", json={"model": pydoc.path.name, "prompt": "x"})
                await asyncio.to_thread(state.load)
                after = await client.get("/health")
                statuses[name] = (before, completion, after)
            if state.scheduler is not None:
                state.scheduler.stop()
        return statuses

    statuses = asyncio.run(scenario())
    before, completion, after = statuses["ok"]
    assert before.status_code == 503 and before.json()["error"]["code"] == "loading"
    assert before.headers["retry-after"] == "1" and completion.status_code == 503
    assert after.status_code == 200
    _, _, failed = statuses["bad"]
    assert failed.status_code == 503 and "the model failed to load" in failed.json()["error"]["message"]
    assert "model.onnx: size 16 does not match" in failed.json()["error"]["message"]


# -- the API surface: n, prompt lists, logprobs, echo, penalties, special tokens, tokenize ------------------------

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_n_choices_of_a_prompt_list_each_equal_generate_with_their_seed(server, engine):
    client = server.client()
    prompts = ["Return the", "def parse("]
    hits = server.metric("luffy:prefix_cache_hits_total")
    got = client.completions.create(model="pydoc", prompt=prompts, n=3, max_tokens=12, temperature=0.8, seed=5,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == list(range(6))
    for choice in got.choices:  # index = prompt * n + i; choice i draws with seed + i
        prompt, i = prompts[choice.index // 3], choice.index % 3
        assert choice.text == alone(engine, prompt, 12, do_sample=True, temperature=0.8, seed=5 + i,
                                    eos_token_id=None)[0]
    # one prefill per prompt: the other two choices copy its KV (counted as prefix-cache hits, as vLLM's n does)
    assert server.metric("luffy:prefix_cache_hits_total") - hits >= 2 * sum(len(engine.tokenizer.encode(p).ids)
                                                                            for p in prompts)
    assert got.usage.prompt_tokens == sum(len(engine.tokenizer.encode(p).ids) for p in prompts)
    assert got.usage.completion_tokens == 6 * 12
    streamed = {}
    for chunk in client.completions.create(model="pydoc", prompt=prompts, n=3, max_tokens=12, temperature=0.8,
                                           seed=5, stream=True, extra_body={"ignore_eos": True}):
        streamed[chunk.choices[0].index] = streamed.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert [streamed[i] for i in range(6)] == [c.text for c in got.choices]
    chat = client.chat.completions.create(model="pydoc", messages=[{"role": "user", "content": "Open the"}], n=2,
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice


def test_logprobs_are_the_log_softmax_of_the_models_own_logits(server, engine):
    client = server.client()
    ids = engine.tokenizer.encode("Return the").ids
    out, logits = engine.generate([ids], max_new_tokens=8, eos_token_id=None, output_logits=True)
    expected = _log_softmax(logits[0])
    tokens = out[0, len(ids):].tolist()
    got = client.completions.create(model="pydoc", prompt="Return the", max_tokens=8, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    assert got.tokens == [chr(t) for t in tokens]  # llama-pydoc's vocabulary is bytes
    np.testing.assert_allclose(got.token_logprobs, expected[np.arange(8), tokens], atol=1e-4)
    for step, top in enumerate(got.top_logprobs):
        best = np.argsort(-expected[step])[:3]
        assert set(top) == {chr(t) for t in best} | {chr(tokens[step])}
        np.testing.assert_allclose([top[chr(t)] for t in best], expected[step, best], atol=1e-4)
    assert got.text_offset == list(range(8))
    chat_ids = engine.tokenizer.encode("<bos>Open the\n", add_special_tokens=False).ids
    chat_out, chat_logits = engine.generate([chat_ids], max_new_tokens=4, eos_token_id=None, output_logits=True)
    chat = client.chat.completions.create(model="pydoc", messages=[{"role": "user", "content": "Open the"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True}).choices[0].logprobs.content
    chat_expected = _log_softmax(chat_logits[0])
    for step, entry in enumerate(chat):
        token = int(chat_out[0, len(chat_ids) + step])
        assert entry.bytes == [token] and len(entry.top_logprobs) == 2
        assert abs(entry.logprob - chat_expected[step, token]) < 1e-4
        assert [t.bytes[0] for t in entry.top_logprobs] == np.argsort(-chat_expected[step])[:2].tolist()
    streamed = [t for c in client.completions.create(model="pydoc", prompt="Return the", max_tokens=8, temperature=0,
                                                     logprobs=0, stream=True, extra_body={"ignore_eos": True})
                for t in c.choices[0].logprobs.token_logprobs]
    np.testing.assert_allclose(streamed, got.token_logprobs, atol=1e-6)


def test_echo_scores_prompts_as_lm_eval_sends_them(server, engine):
    # lm-eval-harness's local-completions: token-id prompts in a list, echo, logprobs, max_tokens 1 (or 0)
    rows = [engine.tokenizer.encode(text).ids for text in ("Return the value", "Open the file")]
    queries = server.metric("luffy:prefix_cache_queries_total")
    for max_tokens in (1, 0):
        body = {"model": "pydoc", "prompt": rows, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
                "temperature": 0}
        response = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json=body, timeout=60).json()
        for row, choice in zip(rows, response["choices"]):
            expected = _log_softmax(engine.score([row])[0])
            logprobs = choice["logprobs"]
            assert len(logprobs["tokens"]) == len(row) + max_tokens and logprobs["token_logprobs"][0] is None
            scored = logprobs["token_logprobs"][1:len(row)]  # what lm-eval sums for a continuation
            np.testing.assert_allclose(scored, expected[np.arange(len(row) - 1), row[1:]], atol=1e-4)
            greedy = [max(top.values()) == lp for top, lp in zip(logprobs["top_logprobs"][1:len(row)], scored)]
            assert greedy == (expected[:-1].argmax(-1) == row[1:]).tolist()  # lm-eval's is_greedy
            assert choice["text"].startswith(engine.tokenizer.decode(row, skip_special_tokens=True))
        assert response["usage"]["completion_tokens"] == max_tokens * len(rows)
    # scoring needs every position's logits: those requests never looked in the prefix cache
    assert server.metric("luffy:prefix_cache_queries_total") == queries


def test_penalties_logit_bias_and_min_p_equal_generate(server, engine):
    client = server.client()
    chained = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, min_p=0.05)
    for sampled in ({}, {"temperature": 0.9, "seed": 3}):
        got = client.completions.create(model="pydoc", prompt="Return the", max_tokens=24,
                                        temperature=sampled.get("temperature", 0), seed=sampled.get("seed"),
                                        presence_penalty=0.5, frequency_penalty=0.4, logit_bias={"101": -4},
                                        extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "ignore_eos": True})
        generated = dict(do_sample=True, **sampled) if sampled else {}
        text, _ = alone(engine, "Return the", 24, eos_token_id=None, logit_bias={101: -4.0}, **chained, **generated)
        assert got.choices[0].text == text
    plain, _ = alone(engine, "Return the", 24, eos_token_id=None)
    assert got.choices[0].text != plain
    # what `vllm bench serve` sends in every request; a temperature below 1e-5 is greedy (1e-40 gave NUL bytes)
    body = {"model": "pydoc", "prompt": "Return the", "max_tokens": 24, "repetition_penalty": 1.0, "logprobs": None,
            "temperature": 1e-40, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json=body, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == plain


def test_special_token_text_in_chat_content_stays_text(server, engine):
    client = server.client()
    messages = [{"role": "user", "content": "Open <eos> the"}]
    expected = [256] + list(b"Open <eos> the\n")  # the template's <bos>; the user's "<eos>" as five characters
    tokens = httpx.post(f"{server.url}/tokenize", headers=server.headers, json={"messages": messages}).json()
    assert tokens["tokens"] == expected and tokens["count"] == len(expected)
    got = client.chat.completions.create(model="pydoc", messages=messages, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.usage.prompt_tokens == len(expected)
    assert got.choices[0].message.content == alone(engine, expected, 12, eos_token_id=None)[0]


def test_tokenize_detokenize_and_one_model(server, engine):
    ids = engine.tokenizer.encode("Return the <eos>").ids
    tokens = httpx.post(f"{server.url}/tokenize", headers=server.headers,
                        json={"model": "pydoc", "prompt": "Return the <eos>", "return_token_strs": True}).json()
    assert tokens == {"count": len(ids), "max_model_len": 1024, "tokens": ids,
                      "token_strs": ["<bos>", *"Return the ", "<eos>"]}  # a completions prompt is the caller's own
    text = httpx.post(f"{server.url}/detokenize", headers=server.headers, json={"tokens": ids}).json()
    assert text == {"prompt": "<bos>Return the <eos>"}
    bad = httpx.post(f"{server.url}/detokenize", headers=server.headers, json={"tokens": [1, 320]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    model = server.client().models.retrieve("pydoc")
    assert model.id == "pydoc" and model.owned_by == "luffy"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")


# -- prefix cache and speculative decoding through the real server ----------------------------------------

@pytest.fixture(scope="module")
def spec_server(pydoc, pydoc_int8):
    """Two slots, a 1 MiB block store (16 blocks of llama-pydoc's 64 KiB) and the int8 build as draft."""
    with ServerProcess(pydoc.path, "--max-num-seqs", "2", "--prefix-cache-mb", "1", "--draft", pydoc_int8.path,
                       "--served-model-name", "pydoc") as running:
        yield running


def _hits(server) -> float:
    return server.metric("luffy:prefix_cache_hits_total")


def test_warm_up_runs_before_ready_and_leaves_nothing_behind(spec_server):
    # target and draft: a prefill chunk and two decode steps over every slot each, before /health said ok
    assert any("warm-up: 6 steps" in line for line in spec_server.log)
    # before any request: the warm-up is no scheduler iteration, no token, and left no block to hit
    for name in ("luffy:scheduler_iterations_total", "luffy:generation_tokens_total", "luffy:prefix_cache_queries_total"):
        assert spec_server.metric(name) == 0


def test_prefix_cache_hit_miss_and_eviction_keep_the_output(spec_server, engine):
    client = spec_server.client()

    def ask(prompt):
        got = client.completions.create(model="pydoc", prompt=prompt, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == alone(engine, prompt, 16, eos_token_id=None)[0]  # as with no cache at all

    system = "Functions of the os module. " * 6  # 168 characters: 10 full blocks with <bos>
    ask(system + "Return the")
    before = _hits(spec_server)
    ask(system + "Open the")  # hit: the free slot still holds the system prompt
    assert _hits(spec_server) - before >= len(system)
    before = _hits(spec_server)
    ask("Completely different words.")  # a miss: only the <bos> every prompt starts with is shared
    assert _hits(spec_server) - before <= 1
    for i in range(4):  # other long prompts overwrite both slots and push more than 16 blocks through the store
        ask(f"{i} Unrelated module documentation text. " * 6 + "Read")
    before = _hits(spec_server)
    ask(system + "Close the")  # evicted from slots and store: computed again, output unchanged
    assert _hits(spec_server) - before < 16


def test_speculation_is_counted_and_keeps_the_output(spec_server, engine):
    client = spec_server.client()
    before = spec_server.metrics()
    for prompt in ("def parse(", "Return the"):
        got = client.completions.create(model="pydoc", prompt=prompt, max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == alone(engine, prompt, 40, eos_token_id=None)[0]
    after = spec_server.metrics()

    def grew(name):
        key = next(k for k in after if k.split("{")[0] == name)
        return after[key] - before.get(key, 0)

    drafted, accepted = grew("luffy:spec_decode_num_draft_tokens_total"), grew("luffy:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted and grew("luffy:spec_decode_num_drafts_total") > 0
