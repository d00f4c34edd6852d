"""`luffy.compile`: resolve → capture → passes → check → emit → publish.

What differs between ONNX Runtime and TensorRT lives in targets/, the pass stages in passes/pipelines.py,
the manifest and report in their own modules; this file is the data flow between them.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

from .. import __version__
from ..errors import UnsupportedModelError, UsageError
from ..passes.driver import count_nodes, initializer_bytes, run_passes
from ..passes.pipelines import stages
from ..runtimes import load
from .capture.onnx_file import load_onnx_source
from .capture.reuse import CaptureCache
from .capture.torch_export import capture_causal_lm, capture_encoder, capture_module
from .config import LuffyConfig
from .emit.artifact import check_output_location, staged_directory, write_manifest
from .emit.manifest import DATA_FILE, MODEL_FILE, build_manifest
from .emit.tokenizer_files import write_chat_template, write_tokenizer
from .quality.parity import check_parity as run_parity_check
from .quality.quality_measure import QualityMeasure
from .quality.verify import Verifier
from .report.compile_report import compile_report, memory_report, reduce_range
from .report.dump_ir import IRDumper
from .report.phases import Phases
from .sources.preflight import check_checkpoint
from .sources.resolve import CAUSAL_LM, ENCODER, resolve_source
from .sources.torch_model import load_torch_model
from .stream.capture import capture_hf
from .stream.checkpoint import Checkpoint
from .stream.parity import check_runs, check_streamed_parity
from .targets import target_for

EXTERNAL_DATA_BYTES = 128 << 20  # above this, weights go to model.onnx.data (protobuf stays small, ORT mmaps)
DEFAULT_MAX_SEQ_LEN = 2048  # for ONNX decoders that carry no position limit
OPTION_ALIASES = {"disable_pass": "disabled_passes", "enable_pass": "enabled_passes"}  # the CLI's flag names


@dataclass
class Artifact:
    """What `compile` returns: where the artifact is, its manifest and compile report."""

    path: Path
    manifest: dict

    @property
    def report(self) -> dict:
        return self.manifest["report"]

    def load(self, **kwargs):
        return load(self.path, **kwargs)


@dataclass
class CaptureResult:
    """The captured graph and what came with it: the torch model (None for an .onnx source), the sequence
    limit the artifact promises, and the capture's time and size for the report."""

    src: Any
    graph: Any  # capture.Captured: the ir.Model, its kind, KV layout, torch reference
    tm: Any
    max_len: int | None
    seconds: float
    nodes: int
    streamed: Any = None  # stream.capture.Streamed when the weights stay in the checkpoint until the write
    estimate: Any = None  # preflight.Estimate of an HF directory's compile (checked before the work)

    @property
    def vocab(self) -> int | None:
        return self.tm.vocab_size if self.tm is not None else None  # what parity checks token ids against


def compile(  # noqa: A001 - the public name the API promises
    source: Any,
    target: str | None = None,
    output: str | os.PathLike | None = None,
    precision: str | None = None,
    opt_level: int | None = None,
    config: LuffyConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    captures: CaptureCache | None = None,
    **options,
) -> Artifact:
    """Compile ``source`` into an artifact directory at ``output``.

    Mirrors ``luffy compile SOURCE --target ort -o DIR --precision fp32 -O2``. Every other keyword is a
    LuffyConfig field (``disable_pass``/``enable_pass`` name its ``disabled_passes``/``enabled_passes``);
    keywords left as None take their value from ``config`` (or LuffyConfig's defaults: target "ort",
    precision "fp32", opt level 2). The stages: resolve → capture → passes → check → emit → publish; the
    output directory appears whole or not at all.
    ``verify=True`` checks the graph after every pass and names the pass that breaks it; ``dump_ir=DIR``
    writes the graph after every pass to DIR/NN-<pass>.onnx. ``captures=CaptureCache()``, passed to several
    compiles of one source, captures it once (compiler/capture/reuse.py; --auto does this for its candidates).

    ``precision`` "int4"/"int8" quantizes weights blockwise (``block_size`` per scale), by GPTQ when
    ``calib`` names a text or token-id file and round-to-nearest otherwise; "int8-dynamic" quantizes
    activations at run time too; "fp16" converts weights and activations. ``eval_file`` measures
    perplexity before and after into ``report["quality"]``.

    ``target="trt"`` takes LuffyConfig's TensorRT fields as keywords (``defer_build``, ``trt_version``,
    ``max_batch``, ``opt_batch``, ``opt_seq_len``, ``timing_cache``, ``hardware_compatibility``,
    ``version_compatible``); without a TensorRT builder and GPU only ``defer_build=True`` succeeds.

    >>> art = luffy.compile("llama-tiny", target="trt", output="build/trt", defer_build=True)  # doctest: +SKIP
    >>> art.manifest["state"], [p["name"] for p in art.manifest["tensorrt"]["profiles"]]      # doctest: +SKIP
    ('needs-build', ['prefill', 'decode'])

    >>> art = luffy.compile("llama-pydoc", output="build/q4", precision="int4",
    ...                     calib="calib.txt", eval_file="heldout.txt")          # doctest: +SKIP
    >>> art.report["quality"]["perplexity_increase_pct"]                        # doctest: +SKIP
    1.2

    >>> import luffy
    >>> art = luffy.compile("llama-tiny", output="build/llama-tiny")   # doctest: +SKIP
    >>> art.report["parity"]["passed"]                                 # doctest: +SKIP
    True
    """
    cfg = config_with(config, target=target, precision=precision, opt_level=opt_level, **options)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    # resolve: every refusal that needs no capture happens here, before minutes of torch.export
    check_paths(cfg, output)
    if cfg.auto:  # the decider sits above the compiler and compiles each candidate through this function
        raise UsageError("auto=True is decided above the compiler: call luffy.compile (luffy/auto.py), which "
                         "compiles each candidate here")
    compile_target = target_for(cfg)
    cfg = compile_target.cfg  # with what the target resolved (TensorRT's version)
    quality: QualityMeasure | None = None  # set after capture; the precision stage's weights read it
    plan = stages(cfg.target, cfg.opt_level, cfg.precision, disabled=cfg.disabled_passes, enabled=cfg.enabled_passes,
                  target_steps=compile_target.extra_steps(), weights=lambda model: quality.weights_for(model),
                  reduce_range=reduce_range(cfg), kv_cache=cfg.kv_cache_dtype,
                  kv_ranges=lambda model: quality.kv_ranges_for(model))
    compile_target.require_tools()
    src = resolve_source(source)
    check_output_location(Path(output))  # an unwritable output fails now, not after minutes of capture

    phases = Phases()  # wall time and peak RSS of each phase, for the report
    with phases("capture"):
        capture = _capture(src, compile_target.capture_opset(), cfg, say, Path(output), captures)
    quality = QualityMeasure(cfg, src, capture.tm, capture.graph, capture.max_len, say, capture.streamed is not None)
    with phases("passes"):
        model, records = _run_stages(plan, capture, cfg, say)
        compile_target.check(model, src.spec, say)
    with staged_directory(Path(output)) as stage:
        emitted, checks = _write_and_check(stage, model, capture, cfg, compile_target, quality, phases, progress, say)
        report = compile_report(cfg, capture, model, records, checks, time.perf_counter() - started)
        report["phases"] = phases.report()  # the manifest's file hashes, after it, are the rest of seconds_total
        manifest = compile_target.finish(stage, build_manifest(cfg, capture, model, emitted, report), say)
        say("writing manifest")
        manifest = write_manifest(stage, manifest)
    return Artifact(Path(output), manifest)


def _write_and_check(stage: Path, model: ir.Model, capture: CaptureResult, cfg: LuffyConfig, compile_target, quality,
                     phases: Phases, progress, say) -> tuple[dict, dict]:
    """(what _emit wrote, what _check_staged found) for the staged artifact, each timed as its own phase; the
    progress callback's ``step`` (the CLI's bar), when it has one, hears of every weight written."""
    with phases("write"):
        say("writing model")
        emitted = _emit(model, stage, capture, cfg, getattr(progress, "step", None))
    with phases("check"):
        checks = _check_staged(stage / MODEL_FILE, capture, cfg, compile_target, quality, say)
    return emitted, checks


def config_with(config: LuffyConfig | None, **keywords) -> LuffyConfig:
    """``config`` with the keywords that are not None applied; lists of passes become tuples (compile's
    keywords, and luffy.compile's before it dispatches)."""
    options = {OPTION_ALIASES.get(name, name): value for name, value in keywords.items()}
    for name in ("disabled_passes", "enabled_passes"):
        options[name] = tuple(options[name]) if options.get(name) else None
    return (config or LuffyConfig()).with_overrides(**options)


def check_paths(cfg: LuffyConfig, output) -> None:
    """The output, --dump-ir, --calib and --eval paths, refused in one line before any capture."""
    if output is None:
        raise UsageError("an output directory is required (-o DIR)")
    if cfg.dump_ir is not None and Path(cfg.dump_ir).resolve().is_relative_to(Path(output).resolve()):
        raise UsageError(f"--dump-ir {cfg.dump_ir} is inside the output directory {output}, which the artifact replaces")
    for flag, path in (("--calib", cfg.calib), ("--eval", cfg.eval_file), ("--kv-calib", cfg.kv_calib)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")


def _capture(src, opset: int, cfg: LuffyConfig, say, output: Path, captures: CaptureCache | None = None) -> CaptureResult:
    say(f"capturing {src.spec}")
    t0 = time.perf_counter()
    captured = streamed = fallback = estimate = None
    if src.kind == "hf-dir" and cfg.stream:
        captured, tm, streamed, fallback = capture_hf(src.path, opset, cfg, say, output)
        estimate = streamed.estimate if streamed is not None else None
    if captured is None:
        estimate = _preflight_whole(src, cfg, output)
        whole = lambda: _capture_whole(src, opset)  # noqa: E731
        captured, tm = captures.get(src, opset, whole) if captures is not None else whole()
    seconds = time.perf_counter() - t0
    if fallback is not None:
        captured.notes.append(f"whole-model capture: the streamed path does not apply ({fallback})")
    if tm is not None and tm.ignored_weights:
        captured.notes.append(f"checkpoint tensors outside the model, not used: {', '.join(tm.ignored_weights[:8])}"
                              + (f" and {len(tm.ignored_weights) - 8} more" if len(tm.ignored_weights) > 8 else ""))
    max_len = _max_seq_len(cfg, tm, captured)
    if max_len:
        # fuse-rotary sizes its constant cos/sin tables by this; it is the artifact's promise anyway.
        captured.model.metadata_props["luffy.max_seq_len"] = str(max_len)
    return CaptureResult(src, captured, tm, max_len, seconds, count_nodes(captured.model), streamed, estimate)


def _preflight_whole(src, cfg: LuffyConfig, output: Path):
    """A safetensors directory about to be loaded whole: refuse it now if it cannot fit (preflight.py)."""
    if src.kind != "hf-dir" or not any(src.path.glob("*.safetensors")):
        return None
    return check_checkpoint(Checkpoint(src.path), cfg, output, streamed=False)


def _capture_whole(src, opset: int):
    """(Captured, TorchModel or None): the source loaded whole (torch or ONNX) and captured."""
    if src.kind == "onnx":
        return load_onnx_source(src.path), None
    tm = load_torch_model(src)
    return {CAUSAL_LM: capture_causal_lm, ENCODER: capture_encoder}.get(tm.kind, capture_module)(tm, opset), tm


def _run_stages(plan, capture: CaptureResult, cfg: LuffyConfig, say) -> tuple[ir.Model, list[dict]]:
    """Every stage's passes in order, each built from the graph the stages before it left."""
    after_pass = _after_pass_hook(cfg, capture.graph, capture.vocab, say)
    model, records = capture.graph.model, []
    for stage in plan:
        model, stage_records = run_passes(model, stage.steps(model), on_pass=lambda name: say(f"pass {name}"),
                                          after_pass=after_pass if stage.numeric_check else _dump_only(after_pass))
        records += stage_records
    if capture.graph.kv is not None:
        capture.graph.kv.dtype = _kv_dtype(model, capture.graph.kv.dtype, cfg.kv_cache_dtype)
    model.producer_name, model.producer_version = "luffy", __version__
    _lower_ir_version(model)
    return model, records


def _emit(model: ir.Model, stage: Path, capture: CaptureResult, cfg: LuffyConfig, step=None) -> dict:
    external = _save_model(model, stage, cfg.external_data, step)
    tokenizer_files, chat_template = _write_tokenizer(stage, capture.src, capture.tm)
    return {"external": external, "tokenizer_files": tokenizer_files, "chat_template": chat_template}


def _check_staged(model_path: Path, capture: CaptureResult, cfg: LuffyConfig, compile_target, quality, say) -> dict:
    """Parity against PyTorch (or, without a reference, the target's load check), memory and quality."""
    parity = None
    kv = cfg.kv_cache_dtype  # a reduced KV cache is judged like reduced weights: by --eval, not by 1e-4
    precision = cfg.precision if kv in ("auto", "fp32") else f"{cfg.precision} with a {kv} KV cache"
    if capture.streamed is not None:
        parity = _check_streamed(model_path, capture, cfg, precision, say)
    elif cfg.check_parity and capture.graph.reference is not None:
        say("checking parity against PyTorch")
        parity = run_parity_check(capture.graph, model_path, capture.vocab, precision)
    else:
        compile_target.check_loadable(model_path, capture.src.spec, say)  # what luffy.load would do
    return {
        "parity": parity,
        "memory": memory_report(model_path, capture.graph, capture.max_len),
        "quality": quality.evaluate(model_path) if cfg.eval_file else None,
    }


def _check_streamed(model_path: Path, capture: CaptureResult, cfg: LuffyConfig, precision: str, say) -> dict | None:
    """A streamed artifact may not fit in memory whole: it is checked region by region (stream/parity.py), or with
    --no-check-parity only loaded and run that way, as luffy.load would load it."""
    if cfg.check_parity:
        say("checking parity against PyTorch, one layer at a time")
        return check_streamed_parity(capture.streamed, capture.graph, model_path, capture.vocab, precision, say)
    say("loading the graph on onnxruntime, one layer at a time")
    check_runs(capture.graph, model_path, capture.vocab, capture.src.spec)
    return None


def _after_pass_hook(cfg: LuffyConfig, captured, vocab: int | None, say):
    """run_passes' after_pass for --dump-ir and --verify (None when neither is on).

    Both start before the first pass: the captured graph is dump 00 and the verify references. The dump
    runs before the check, so the graph of a pass that breaks parity is on disk when the error is raised.
    """
    hooks = []
    if cfg.dump_ir is not None:
        dumper = IRDumper(cfg.dump_ir)
        dumper.dump("captured", captured.model)
        hooks.append(dumper)
    if cfg.verify:
        say("computing --verify references on the captured graph")
        hooks.append(Verifier(captured, vocab))
    if not hooks:
        return None

    def after_pass(name: str, model: ir.Model) -> dict:
        record = {}
        for hook in hooks:
            record.update(hook(name, model))
        return record

    after_pass.hooks = hooks  # _dump_only picks the dumper out for the precision passes
    return after_pass


def _dump_only(after_pass):
    # --verify's numeric check holds passes to fp32 parity; a precision pass is judged by --eval instead.
    if after_pass is None:
        return None
    hooks = [h for h in getattr(after_pass, "hooks", []) if not getattr(h, "checks_numerics", False)]
    if not hooks:
        return None
    return lambda name, model: {k: v for h in hooks for k, v in (h(name, model) or {}).items()}


def _kv_dtype(model: ir.Model, default: str, chosen: str = "auto") -> str:
    if chosen == "int4":  # stored two to a byte (uint8): numpy's name would say uint8
        return "int4"
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values.") and value.dtype is not None:
            return str(np.dtype(value.dtype.numpy()))
    return default


def _lower_ir_version(model: ir.Model) -> None:
    # onnx.helper stamps the newest IR version it knows, which a released onnxruntime may not read yet
    # ("Unsupported model IR version: 14"). The opsets in use fix the IR version actually required.
    needed = onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()],
        ignore_unknown=True,
    )
    if needed < model.ir_version:
        model.ir_version = needed


def _max_seq_len(cfg: LuffyConfig, tm, captured) -> int | None:
    if captured.kind != CAUSAL_LM and (tm is None or tm.max_positions is None):
        return cfg.max_seq_len
    limit = tm.max_positions if tm is not None else None
    if cfg.max_seq_len is None:
        return limit or DEFAULT_MAX_SEQ_LEN
    if limit is not None and cfg.max_seq_len > limit:
        raise UsageError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's position limit {limit}")
    return cfg.max_seq_len


def _save_model(model: ir.Model, stage: Path, mode: str, step=None) -> bool:
    """Write model.onnx (and its weights to model.onnx.data when large); ``step(what, done, total)`` hears of every
    weight written (the CLI's progress bar). Weights still in a checkpoint are read and converted one at a time."""
    try:
        weight_bytes = initializer_bytes(model)
        external = mode == "always" or (mode == "auto" and weight_bytes > EXTERNAL_DATA_BYTES)
        if external:
            ir.save(model, stage / MODEL_FILE, external_data=DATA_FILE, callback=_weight_progress(step))
        else:
            ir.save(model, stage / MODEL_FILE)
    except (ir.serde.SerdeError, TypeError, ValueError) as exc:  # a tensor or attribute ONNX cannot encode
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise UnsupportedModelError(f"cannot write the graph as ONNX: {type(root).__name__}: {root}") from exc
    return external


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _weight_progress(step):
    """ir.save's per-tensor callback as ``step("writing weights: layer N", tensors done, tensors)``."""
    if step is None:
        return None
    done = [0]

    def callback(tensor, info) -> None:
        done[0] += 1
        match = _LAYER.search(tensor.name or "")
        step(f"writing weights{f': layer {match.group(1)}' if match else ''}", done[0], info.total)

    return callback


def _write_tokenizer(stage: Path, src, tm) -> tuple[list[str], dict | None]:
    """The tokenizer files written, and the manifest's ``chat_template`` record (None without a template)."""
    source_dir = tm.tokenizer_dir if tm is not None else (src.path.parent if src.kind == "onnx" else None)
    names = write_tokenizer(stage, tokenizer=tm.tokenizer if tm is not None else None, source_dir=source_dir)
    if tm is not None and tm.chat_template is not None:
        return names, write_chat_template(stage, template=tm.chat_template, special=tm.special_tokens)
    return names, write_chat_template(stage, source_dir) if source_dir is not None else None


