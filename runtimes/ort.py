"""The ONNX Runtime engine: one InferenceSession, IO binding, the preallocated KV cache. No torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, CapacityError, UsageError, first_line
from . import speculative
from .constraint import warn_incomplete
from .cpu_bf16 import cpu_model
from .cpu_features import u8s8_saturates
from .engine import Engine
from .generation import generate_loop, left_pad
from .huge_pages import MIN_REGION, NOTHING_COLLAPSED, anonymous_mappings, back_new_mappings_with_huge_pages
from .manifest import step_graph
from .mapped_weights import NOTHING_RELEASED, release_file_pages
from .ort_compat import engine_session_options, import_onnxruntime
from .ort_slots import OrtSlots

_NUMPY_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,  # int8 and 4-bit packed KV caches
}


def _weight_file_bytes(manifest: dict) -> int:
    files = manifest.get("files", {})
    return sum(files.get(name, {}).get("size", 0) for name in (manifest["model_file"], manifest.get("external_data")) if name)


def _require_int8_kernels_fit(manifest: dict, path: Path, providers: list[str] | None) -> None:
    """An int8-dynamic artifact with 8-bit weights gives wrong outputs on x86 CPUs without VNNI."""
    on_cpu = not providers or providers == ["CPUExecutionProvider"]
    if manifest.get("int8_reduce_range") is False and on_cpu and u8s8_saturates():
        raise ArtifactError(
            f"{path}: int8-dynamic artifact with 8-bit weights needs a CPU with VNNI (AVX512-VNNI, AVX-VNNI or "
            "AMX); this CPU's int8 kernels saturate. Recompile with --reduce-range (correct on every CPU)")


class OrtEngine(Engine):
    """Runs an artifact's model.onnx on ONNX Runtime (CPU unless ``providers`` says otherwise).

    ``huge_pages`` (default on) backs the weights ORT allocates on the CPU with transparent huge pages
    (see huge_pages.py; ``self.huge_pages`` reports what the kernel did). The engine's thread pool (its own, or
    the process's once ``share_thread_pool`` made one) spins only during its runs, so engines that take turns (a
    target and its draft) never compete for the cores (ort_compat.engine_session_options); ``self.thread_pool``
    describes it. ``profile`` (a path prefix) turns on ONNX Runtime's profiler: every run and node is timed into
    a JSON trace that ``self.session.end_profiling()`` writes and names (benchmarks/step_profile.py reads it).
    """

    def __init__(
        self, path: Path, manifest: dict, threads: int | None = None, providers: list[str] | None = None,
        huge_pages: bool = True, spin: bool = True, profile: str | None = None,
    ):
        super().__init__(path, manifest)
        ort = import_onnxruntime()
        # threads that sleep once each run ends: engines that take turns never fight for the cores
        options, self.thread_pool = engine_session_options(threads, spin)
        if profile is not None:
            options.enable_profiling, options.profile_file_prefix = True, str(profile)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._ort = ort
        model_path = self.path / manifest["model_file"]
        _require_int8_kernels_fit(manifest, self.path, providers)
        providers = providers or ["CPUExecutionProvider"]
        # ORT's CPU kernels have no bf16: a bf16 artifact runs there through its fp32 emulation (a check path)
        on_cpu = providers == ["CPUExecutionProvider"]
        # weights smaller than one MIN_REGION cannot make a collapsible mapping: skip reading smaps for them
        track = huge_pages and on_cpu and _weight_file_bytes(manifest) >= MIN_REGION
        try:
            source = cpu_model(model_path) if on_cpu else str(model_path)
            mappings_before = anonymous_mappings() if track else None
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            reason = first_line(exc)
            raise ArtifactError(f"{model_path}: onnxruntime {ort.__version__} cannot load it: {reason}") from None
        self.huge_pages = None if not (huge_pages and on_cpu) else (
            back_new_mappings_with_huge_pages(mappings_before) if track else dict(NOTHING_COLLAPSED))
        # pages of the weight file that prepacking read and a shared initializer keeps mapped (mapped_weights.py)
        self.released_file_pages = release_file_pages(self.path) if on_cpu else dict(NOTHING_RELEASED)
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.kind == "causal-lm":
            self.graph = step_graph(
                self.path, manifest, {i.name: (i.type, i.shape) for i in self.session.get_inputs()},
                {o.name: o.shape for o in self.session.get_outputs()})
            self.kv_dtype = _NUMPY_DTYPES.get(self.graph.kv_type, np.float32)

    # -- decoder --------------------------------------------------------------------------------------
    @property
    def vocab(self) -> int | None:
        graph = getattr(self, "graph", None)  # the graph's own logits dimension, checked at load
        return graph.vocab if graph is not None else super().vocab

    def open_slots(self, num_slots: int, capacity: int, allocate=None) -> OrtSlots:
        """A persistent KV cache of ``num_slots`` sequences up to ``capacity`` positions each, and the step that
        runs this graph over any run of them (what generate, score and the serving scheduler drive).

        >>> slots = engine.open_slots(16, 1024)     # doctest: +SKIP
        """
        self._require_decoder("open_slots")
        if capacity < 1 or (self.max_seq_len is not None and capacity > self.max_seq_len):
            raise CapacityError(f"KV slot capacity {capacity} must be in [1, {self.max_seq_len}] (the artifact's "
                                f"maximum sequence length)")
        return OrtSlots(self, num_slots, capacity, **({"allocate": allocate} if allocate is not None else {}))

    def generate(
        self, input_ids, max_new_tokens: int = 32, min_new_tokens: int = 0, do_sample: bool = False,
        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
        repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
        logit_bias: dict | None = None, constraint=None, eos_token_id="model", pad_token_id=None,
        seed: int | None = None, output_logits: bool = False, streamer=None, assistant_model=None,
        num_assistant_tokens: int = 4, num_assistant_tokens_schedule: str = "heuristic",
        prompt_lookup_num_tokens: int | None = None, max_matching_ngram_size: int = 2, json_schema=None,
        regex: str | None = None, grammar: str | None = None, choice: list[str] | None = None,
    ):
        """Generate up to ``max_new_tokens`` per row; returns int64 [batch, prompt + new], left-padded.

        ``input_ids`` is a 2-D array or a list of token-id lists (ragged rows are left-padded, and each row
        gets exactly the tokens it would get alone). ``eos_token_id`` defaults to the model's; None
        disables stopping. ``output_logits=True`` returns ``(ids, logits)`` with the raw logits of every
        generated position, [batch, new, vocab]. ``streamer(tokens)`` receives each step's new tokens
        ([batch] int64) as soon as they are chosen.

        Tokens are chosen through the one logits chain (runtimes/sampling.py), in its order: the penalties
        (``repetition_penalty`` as transformers', over each row's prompt and output; OpenAI's
        ``presence_penalty`` and ``frequency_penalty`` over its output), ``logit_bias`` ({token id: bias}),
        the ``constraint`` (a grammar: one object, or a list with one per row), ``min_new_tokens``, then
        ``temperature`` (below 1e-5: greedy), ``top_k``, ``top_p``, ``min_p``.

        Speculative decoding (Hugging Face's names): ``assistant_model=draft_engine`` proposes up to
        ``num_assistant_tokens`` tokens per round, ``prompt_lookup_num_tokens=K`` up to K tokens that followed
        the last ``max_matching_ngram_size``-gram earlier in the sequence. Under the "heuristic" schedule the
        count moves like transformers' (+2 after a fully accepted round, -1 otherwise) between 1 and that
        maximum; "constant" keeps it. The target checks them in one step: greedy output is exactly plain
        greedy's, sampled output keeps the target's distribution. Rows are verified one after another (a
        multi-token step with a cache is batch 1), so ``streamer`` then receives each row's tokens as [1]
        arrays, row by row. ``self.generation_stats`` holds the acceptance rate and tokens per target step.

        >>> draft = luffy.load("build/ref-int8")                                          # doctest: +SKIP
        >>> engine.generate(ids, max_new_tokens=128, assistant_model=draft)               # doctest: +SKIP

        >>> engine.generate([[256, 72], [256, 72, 105, 33]], max_new_tokens=4).shape   # doctest: +SKIP
        (2, 8)

        Structured outputs: ``json_schema`` (a dict or JSON text; output compact, as OpenAI's ``strict``),
        ``regex``, ``grammar`` (Lark or GBNF) or ``choice`` (a list of strings) give every row an llguidance
        grammar (runtimes/grammar.py) as its ``constraint``. A row ends when its grammar is complete and allows
        nothing more; one that runs out of ``max_new_tokens`` first is cut off, with a RuntimeWarning.

        >>> ids = engine.generate(rows, 64, json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})  # doctest: +SKIP
        """
        rows, eos_token_id, pad = self._generate_inputs(input_ids, max_new_tokens, eos_token_id, pad_token_id)
        sampling = self._sampling(eos_token_id, min_new_tokens, do_sample, temperature, top_k, top_p, min_p,
                                  repetition_penalty, presence_penalty, frequency_penalty, logit_bias)
        constraints = self._row_constraints(constraint, len(rows), max_new_tokens, dict(
            json_schema=json_schema, regex=regex, grammar=grammar, choice=choice))
        prompt_len = max(len(r) for r in rows)
        if (assistant_model is not None or prompt_lookup_num_tokens) and max_new_tokens > 0:
            out = self._speculative(rows, max_new_tokens, pad, seed, output_logits, streamer, assistant_model,
                                    num_assistant_tokens, num_assistant_tokens_schedule, prompt_lookup_num_tokens,
                                    max_matching_ngram_size, sampling, constraints)
            warn_incomplete(constraints, max_new_tokens)
            return out
        self.generation_stats = None
        ids, mask = left_pad(rows, pad)
        slots = self.open_slots(len(rows), prompt_len + max_new_tokens)

        def last_logits(step_ids, real):  # every row steps together: left padding keeps their lengths equal
            return slots.step(0, len(rows), step_ids, real, keep=1)[:, -1, :]

        out = generate_loop(last_logits, ids, mask, max_new_tokens, sampling, pad_token_id=pad, seed=seed,
                            output_logits=output_logits, streamer=streamer, constraints=constraints)
        warn_incomplete(constraints, max_new_tokens)
        return out

    def _speculative(self, rows, max_new_tokens, pad, seed, output_logits, streamer, assistant_model, k, schedule,
                     lookup_k, max_ngram, sampling, constraints):
        if assistant_model is not None and lookup_k:
            raise UsageError("give assistant_model or prompt_lookup_num_tokens, not both")
        if schedule not in ("heuristic", "constant"):
            raise UsageError(f"num_assistant_tokens_schedule {schedule!r}; choose heuristic or constant")
        k = lookup_k or k
        if k < 1 or max_ngram < 1:
            raise UsageError("the number of proposed tokens and max_matching_ngram_size must be >= 1")
        width = max(len(r) for r in rows)
        # K is a ceiling, unlike transformers' heuristic, which grows without one: a draft token costs a third
        # of a target step here (int8 for fp32 on a CPU), and uncapped K drifted to 10-16 and wasted draft steps
        # past the first rejection (156M reference Llama: 1.41x plain decode uncapped, 1.64x capped at 4)
        adaptive = speculative.AdaptiveK(k, schedule == "heuristic")
        if assistant_model is not None:
            speculative.check_draft(self, assistant_model)
            source = speculative.DraftModel(assistant_model, 1, width + max_new_tokens)  # rows run one at a time
        else:
            source = speculative.PromptLookup(max_ngram)
        ids, logits, stats = speculative.generate(self, rows, max_new_tokens, source, adaptive, sampling, pad, seed,
                                                  output_logits, streamer, constraints)
        self.generation_stats = stats.to_json()
        return (ids, logits) if output_logits else ids

    def score(self, input_ids, attention_mask=None) -> np.ndarray:
        """float32 logits [batch, seq, vocab] for every position (positions follow the attention mask).

        >>> engine.score([[256, 72, 105]]).shape   # doctest: +SKIP
        (1, 3, 320)
        """
        ids, mask = self._score_inputs(input_ids, attention_mask)
        slots = self.open_slots(ids.shape[0], ids.shape[1])
        return np.array(slots.step(0, ids.shape[0], ids, mask, keep=None), copy=True)

    # -- any graph ------------------------------------------------------------------------------------
    def run(self, feeds: dict) -> dict:
        """Run the graph once on ``feeds`` (name -> array); returns every output by name.

        >>> engine.run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]   # doctest: +SKIP
        """
        missing = set(self.input_types) - set(feeds)
        unknown = set(feeds) - set(self.input_types)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing inputs {sorted(missing)}")
            if unknown:
                parts.append(f"unknown inputs {sorted(unknown)}")
            raise UsageError(f"{self.path}: {'; '.join(parts)}; the graph takes {sorted(self.input_types)}")
        arrays = {}
        for name, value in feeds.items():
            if value is None or not self.input_types[name].startswith("tensor("):
                arrays[name] = value  # an absent optional, a sequence or an optional: ORT takes them as they are
                continue
            want = _NUMPY_DTYPES.get(self.input_types[name])
            try:
                arr = np.asarray(value)
                arrays[name] = arr.astype(want) if want is not None and arr.dtype != want else arr
            except (OverflowError, ValueError, TypeError) as exc:
                raise UsageError(f"{self.path}: input {name!r} cannot be made a {self.input_types[name]} ({exc})") from None
        try:
            outputs = self.session.run(None, arrays)
        except Exception as exc:  # ORT raises its own exception types for shape/type errors
            raise UsageError(f"{self.path}: {first_line(exc)}") from None
        return dict(zip(self.output_names, outputs))
