"""Runs one peer engine inside the peer's own Python (its venv), timed there: `luffy bench`'s far end.

Started by benchmarks/native_peers.py as ``PEER_PYTHON peer_driver.py ENGINE MODEL_DIR THREADS``; reads one JSON
request per line on stdin ({"ids": [[...]], "new_tokens": N}) and answers one JSON line on stdout:
{"ttft_s", "total_s", "tokens"} measured here, around the engine's own generate call, so the pipe between
the processes is never timed. The first line it writes says what it loaded. It imports nothing from luffy:
the peer's venv need not have luffy installed. Greedy, end of sequence never stops a run (the bench's rule).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np  # ctranslate2 and openvino both depend on numpy: every peer venv has it


class CTranslate2:
    """CTranslate2's Generator on a converted model directory; prompts go in as the model's token strings."""

    def __init__(self, model_dir: str, threads: int):
        import ctranslate2

        self.generator = ctranslate2.Generator(model_dir, device="cpu", intra_threads=threads)
        with open(f"{model_dir}/vocabulary.json") as f:  # the converter writes the vocabulary id -> token string
            self.vocab = json.load(f)
        self.info = {"label": f"CTranslate2 {ctranslate2.__version__}", "vocab": len(self.vocab), "threads": threads}

    def generate(self, ids: list[list[int]], new_tokens: int, first_token) -> list[int]:
        prompts = [[self.vocab[t] for t in row] for row in ids]
        if len(prompts) == 1:  # the streaming API: one step at a time, so the first token can be marked
            out = []
            for step in self.generator.generate_tokens(prompts[0], max_length=new_tokens, min_length=new_tokens,
                                                       sampling_topk=1):
                if not out:
                    first_token()
                out.append(step.token_id)
            return out
        first_token()  # batched generate_batch returns whole sequences: time to first token is not observable
        results = self.generator.generate_batch(prompts, max_length=new_tokens, min_length=new_tokens,
                                                sampling_topk=1, include_prompt_in_result=False)
        return list(results[0].sequences_ids[0])


class OpenVINO:
    """OpenVINO GenAI's LLMPipeline on an exported OpenVINO IR directory, on the CPU plugin."""

    def __init__(self, model_dir: str, threads: int):
        import openvino_genai

        self.genai = openvino_genai
        # The bench sends the same prompt every run: a prefix cache would skip the prefill it times (measured:
        # 5 ms instead of 37 for 128 tokens), and luffy's engine keeps none. So the cache is off.
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        self.pipe = openvino_genai.LLMPipeline(model_dir, "CPU", scheduler_config=scheduler,
                                               INFERENCE_NUM_THREADS=threads)
        self.info = {"label": f"OpenVINO GenAI {openvino_genai.__version__}", "threads": threads}

    def generate(self, ids: list[list[int]], new_tokens: int, first_token) -> list[int]:
        import openvino

        config = self.genai.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                             ignore_eos=True)
        genai = self.genai

        class FirstToken(genai.StreamerBase):
            """Marks the first token as it is produced. (A plain callable streamer gets decoded text, which random
            token ids may never yield: it was never called, and the first token was marked at the end.)"""

            def __init__(self):
                super().__init__()
                self.marked = False

            def write(self, _token):
                if not self.marked:
                    self.marked = True
                    first_token()
                return genai.StreamingStatus.RUNNING

            def end(self):
                pass

        streamer = FirstToken() if len(ids) == 1 else None
        tensor = openvino.Tensor(np.asarray(ids, dtype=np.int64))
        result = self.pipe.generate(tensor, config, streamer=streamer)
        if streamer is None or not streamer.marked:
            first_token()
        return [int(t) for t in result.tokens[0]]


ENGINES = {"ctranslate2": CTranslate2, "openvino": OpenVINO}


def main(argv: list[str]) -> None:
    engine_name, model_dir, threads = argv[0], argv[1], int(argv[2])
    engine = ENGINES[engine_name](model_dir, threads)
    print(json.dumps(engine.info), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        marks = []
        start = time.perf_counter()
        tokens = engine.generate(request["ids"], request["new_tokens"], lambda: marks.append(time.perf_counter()))
        total = time.perf_counter() - start
        print(json.dumps({"ttft_s": marks[0] - start, "total_s": total, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
