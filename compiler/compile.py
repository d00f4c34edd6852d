"""`luffy.compile`: source -> capture -> pass pipeline -> emit -> parity check -> published artifact."""

from __future__ import annotations

import collections
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from .. import __version__
from ..errors import UsageError, first_line
from ..passes.driver import count_nodes, run_passes
from ..passes.pipelines import pipeline, precision_steps
from ..runtimes.manifest import FORMAT_VERSION, STATE_READY
from .artifact import check_output_location, staged_directory, write_manifest
from .config import LuffyConfig
from .quality import QualityMeasure
from .sources import CAUSAL_LM, ENCODER, resolve_source

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_BYTES = 128 << 20  # above this, weights go to model.onnx.data (protobuf stays small, ORT mmaps)
DEFAULT_MAX_SEQ_LEN = 2048  # for ONNX decoders that carry no position limit


@dataclass
class Artifact:
    """What `compile` returns: where the artifact is, its manifest and compile report."""

    path: Path
    manifest: dict

    @property
    def report(self) -> dict:
        return self.manifest["report"]

    def load(self, **kwargs):
        from ..runtimes import load

        return load(self.path, **kwargs)


def compile(  # noqa: A001 - the public name the API promises
    source: Any,
    target: str | None = None,
    output: str | os.PathLike | None = None,
    precision: str | None = None,
    opt_level: int | None = None,
    config: LuffyConfig | None = None,
    *,
    max_seq_len: int | None = None,
    disable_pass: list[str] | None = None,
    enable_pass: list[str] | None = None,
    check_parity: bool | None = None,
    external_data: str | None = None,
    verify: bool | None = None,
    dump_ir: str | os.PathLike | None = None,
    block_size: int | None = None,
    calib: str | os.PathLike | None = None,
    eval_file: str | os.PathLike | None = None,
    accuracy_level: int | None = None,
    progress: Callable[[str], None] | None = None,
    **trt_options,
) -> Artifact:
    """Compile ``source`` into an artifact directory at ``output``.

    Mirrors ``luffy compile SOURCE --target ort -o DIR --precision fp32 -O2``. Keywords left as None take
    their value from ``config`` (or LuffyConfig's defaults: target "ort", precision "fp32", opt level 2).
    ``verify=True`` checks the graph after every pass and names the pass that breaks it; ``dump_ir=DIR``
    writes the graph after every pass to DIR/NN-<pass>.onnx.

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
    cfg = (config or LuffyConfig()).with_overrides(
        target=target, precision=precision, opt_level=opt_level, max_seq_len=max_seq_len,
        disabled_passes=tuple(disable_pass) if disable_pass else None,
        enabled_passes=tuple(enable_pass) if enable_pass else None,
        check_parity=check_parity, external_data=external_data, verify=verify, dump_ir=dump_ir,
        block_size=block_size, calib=calib, eval_file=eval_file, accuracy_level=accuracy_level, **trt_options,
    )
    if output is None:
        raise UsageError("an output directory is required (-o DIR)")
    if cfg.dump_ir is not None and Path(cfg.dump_ir).resolve().is_relative_to(Path(output).resolve()):
        raise UsageError(f"--dump-ir {cfg.dump_ir} is inside the output directory {output}, which the artifact replaces")
    say = progress or (lambda message: None)
    for flag, path in (("--calib", cfg.calib), ("--eval", cfg.eval_file)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    steps = pipeline(cfg.target, cfg.opt_level, cfg.disabled_passes, cfg.enabled_passes)
    precision_steps(cfg.precision, target=cfg.target)  # a precision the target cannot take fails before capture
    builder = None
    if cfg.target == "trt":
        from .trt_build import require_builder

        cfg = cfg.with_overrides(trt_version=_trt_version(cfg))
        if cfg.precision in ("int4", "int8") and _capture_opset(cfg) < 21:
            raise UsageError(f"--precision {cfg.precision} for TensorRT {cfg.trt_version}: QDQ weights need blockwise "
                             f"DequantizeLinear (opset 21), which TensorRT's parser reads from 10.6; "
                             f"use --trt-version 10.6 or newer, or --precision fp16")
        if not cfg.defer_build:
            builder = require_builder()  # fails fast, before minutes of capture, saying how to proceed
    src = resolve_source(source)
    check_output_location(Path(output))  # an unwritable output fails now, not after minutes of capture
    started = time.perf_counter()

    say(f"capturing {src.spec}")
    t0 = time.perf_counter()
    captured, tm = _capture(src, _capture_opset(cfg))
    capture_seconds = time.perf_counter() - t0
    captured_nodes = count_nodes(captured.model)
    if tm is not None and tm.ignored_weights:
        captured.notes.append(f"checkpoint tensors outside the model, not used: {', '.join(tm.ignored_weights[:8])}"
                              + (f" and {len(tm.ignored_weights) - 8} more" if len(tm.ignored_weights) > 8 else ""))
    max_len = _max_seq_len(cfg, tm, captured)
    vocab = tm.vocab_size if tm else None  # what parity checks token ids against

    if max_len:
        # fuse-rotary sizes its constant cos/sin tables by this; it is the artifact's promise anyway.
        captured.model.metadata_props["luffy.max_seq_len"] = str(max_len)
    after_pass = _after_pass_hook(cfg, captured, vocab, say)
    model, pass_records = run_passes(captured.model, steps, on_pass=lambda name: say(f"pass {name}"), after_pass=after_pass)
    if cfg.target == "trt":
        from ..passes.pipelines import plugin_steps
        from .trt_support import version_tuple

        model, plugin_records = run_passes(
            model, plugin_steps(cfg.target, cfg.opt_level, version_tuple(cfg.trt_version), cfg.disabled_passes or ()),
            on_pass=lambda name: say(f"pass {name}"), after_pass=after_pass)
        pass_records += plugin_records
    quality = QualityMeasure(cfg, src, tm, captured, max_len, say)
    if cfg.precision != "fp32":
        quality.measure_reference(model)
        model, precision_records = run_passes(
            model, precision_steps(cfg.precision, quality.weight_spec(model), cfg.target, _reduce_range(cfg)),
            on_pass=lambda name: say(f"pass {name}"), after_pass=_dump_only(after_pass),
        )
        pass_records += precision_records
        if captured.kv is not None:
            captured.kv.dtype = _kv_dtype(model, captured.kv.dtype)
    model.producer_name, model.producer_version = "luffy", __version__
    _lower_ir_version(model)
    if cfg.target == "ort":
        _require_runnable_on_ort(model, src.spec)
    operator_check = None
    if cfg.target == "trt":
        from .trt_support import check_graph, require_supported

        say(f"checking every node against TensorRT {cfg.trt_version}'s ONNX parser")
        operator_check = check_graph(model, cfg.trt_version)
        require_supported(operator_check, f"{src.spec} (legalized for --target trt)")

    with staged_directory(Path(output)) as stage:
        say("writing model")
        external = _save_model(model, stage, cfg.external_data)
        tokenizer_files, chat_template = _write_tokenizer(stage, src, tm)
        parity = None
        if cfg.check_parity and captured.reference is not None:
            say("checking parity against PyTorch")
            from .parity import check_parity as run_parity_check

            parity = run_parity_check(captured, stage / MODEL_FILE, vocab, cfg.precision)
        elif cfg.target == "ort":
            say("loading the graph on onnxruntime")
            _require_loadable_on_ort(stage / MODEL_FILE, src.spec)  # what luffy.load would do, before publishing
        memory = _memory_report(stage / MODEL_FILE, captured, max_len)
        report = {
            "seconds_total": round(time.perf_counter() - started, 3),
            "capture": {
                "seconds": round(capture_seconds, 3),
                "method": "onnx file" if src.kind == "onnx" else "torch.export + torch.onnx (dynamo)",
                "nodes": captured_nodes, "notes": captured.notes,
            },
            "passes": pass_records,
            "nodes": count_nodes(model),
            "op_histogram": op_histogram(model),
            "parameters": parameter_count(model),
            "parity": parity,
            "memory": memory,
            "precision": _precision_report(cfg, pass_records),
            "quality": quality.evaluate(stage / MODEL_FILE) if cfg.eval_file else None,
        }
        manifest = _manifest(cfg, src, tm, captured, model, max_len, tokenizer_files, external, report)
        manifest["chat_template"] = chat_template
        if cfg.target == "trt":
            manifest = _tensorrt_section(cfg, manifest, operator_check)
            if builder is not None:
                from .trt_build import build_in_directory

                manifest = build_in_directory(stage, manifest, *builder, say=say)
        say("writing manifest")
        manifest = write_manifest(stage, manifest)
    return Artifact(Path(output), manifest)


def _capture(src, opset: int):
    if src.kind == "onnx":
        from .onnx_source import load_onnx_source

        return load_onnx_source(src.path), None
    from .capture import capture_causal_lm, capture_encoder, capture_module
    from .sources import load_torch_model

    tm = load_torch_model(src)
    capture = {CAUSAL_LM: capture_causal_lm, ENCODER: capture_encoder}.get(tm.kind, capture_module)
    return capture(tm, opset), tm


def _trt_version(cfg: LuffyConfig) -> str:
    from .trt_build import installed_tensorrt
    from .trt_support import known_versions, operator_list

    if cfg.trt_version is not None:
        operator_list(cfg.trt_version)  # validates the text and the major version
        return cfg.trt_version
    trt = installed_tensorrt()
    return trt.__version__ if trt is not None else known_versions()[-1]


def _capture_opset(cfg: LuffyConfig) -> int:
    from .capture import CAPTURE_OPSET, ONNX_OPSET
    from .trt_support import version_tuple

    # TensorRT before 10.15 parses neither RMSNormalization nor RotaryEmbedding: those get a decomposed
    # graph at the highest opset their parser reads up to 22 (10.0-10.5: 20; 10.6-10.14: 22, which
    # int4/int8 need for blockwise DequantizeLinear), RMSNorm as a luffy plugin from 10.7 on, and
    # TensorRT's own fusions take the rest.
    if cfg.target == "trt" and version_tuple(cfg.trt_version) < PORTABLE_OPS_SINCE:
        from .trt_support import operator_list

        return max(ONNX_OPSET, min(22, operator_list(cfg.trt_version)[1]["opset_range"][1]))
    return CAPTURE_OPSET[cfg.target]


PORTABLE_OPS_SINCE = (10, 15)  # the first TensorRT whose parser has Attention, RMSNormalization, RotaryEmbedding


def _tensorrt_section(cfg: LuffyConfig, manifest: dict, operator_check: dict) -> dict:
    """The needs-build state: profiles, the operator check, and the trtexec line that builds the engine."""
    from ..runtimes.manifest import STATE_NEEDS_BUILD
    from .trt_build import ENGINE_FILE, operator_check_summary
    from .trt_profiles import optimization_profiles, trtexec_command
    from .trt_support import version_tuple

    profiles = optimization_profiles(manifest, cfg.max_batch, cfg.opt_batch, cfg.opt_seq_len)
    options = {k: v for k, v in cfg.to_json().items() if k in (
        "trt_version", "max_batch", "opt_batch", "opt_seq_len", "timing_cache", "hardware_compatibility",
        "version_compatible")}
    command = trtexec_command(profiles, manifest["model_file"], ENGINE_FILE,
                              strongly_typed=version_tuple(cfg.trt_version) < (11,),
                              hardware_compatibility=cfg.hardware_compatibility,
                              version_compatible=cfg.version_compatible)
    check = operator_check_summary(operator_check)
    section = {
        "options": options, "profiles": profiles, "trtexec": command, "engine_file": None, "build": None,
        "operator_check": check,
        "next_step": "run `luffy build ARTIFACT` on the GPU machine, or the trtexec line in this directory",
    }
    if check["plugins"]:
        # tensorrt.plugin implementations are Python: only a process that registered them can parse the graph
        section["next_step"] = (f"run `luffy build ARTIFACT` on the GPU machine (the graph uses luffy plugins "
                                f"{', '.join(check['plugins'])}, which trtexec cannot load)")
    return dict(manifest, state=STATE_NEEDS_BUILD, tensorrt=section)


def _after_pass_hook(cfg: LuffyConfig, captured, vocab: int | None, say):
    """run_passes' after_pass for --dump-ir and --verify (None when neither is on).

    Both start before the first pass: the captured graph is dump 00 and the verify references. The dump
    runs before the check, so the graph of a pass that breaks parity is on disk when the error is raised.
    """
    hooks = []
    if cfg.dump_ir is not None:
        from .dump_ir import IRDumper

        dumper = IRDumper(cfg.dump_ir)
        dumper.dump("captured", captured.model)
        hooks.append(dumper)
    if cfg.verify:
        from .verify import Verifier

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


def _kv_dtype(model: ir.Model, default: str) -> str:
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values.") and value.dtype is not None:
            return str(np.dtype(value.dtype.numpy()))
    return default


def _reduce_range(cfg: LuffyConfig) -> bool:
    from ..runtimes.cpu_features import u8s8_saturates

    return u8s8_saturates() if cfg.reduce_range is None else cfg.reduce_range


def _precision_report(cfg: LuffyConfig, records: list[dict]) -> dict:
    """What was quantized and how: the precision passes' own records, plus totals by op."""
    out = {"precision": cfg.precision}
    if cfg.precision == "int8-dynamic":
        from ..runtimes.cpu_features import int8_kernel_path

        out["reduce_range_chosen_by"] = "this CPU" if cfg.reduce_range is None else "option"
        out["compiled_on"] = int8_kernel_path()
    for record in records:
        if record["name"] in ("quantize-weights", "convert-fp16", "quantize-dynamic-int8"):
            out.update({k: v for k, v in record.items() if k not in ("name", "modified", "nodes_before", "nodes_after")})
    return out


MEMORY_SCENARIO_TOKENS = 128  # the report's reference prefill / decode point (the benchmark's prompt length)


def _memory_report(model_path: Path, captured, max_len: int | None) -> dict | None:
    if captured.kind != CAUSAL_LM:
        return None
    from .memory import decoder_memory_report

    tokens = min(MEMORY_SCENARIO_TOKENS, (max_len or MEMORY_SCENARIO_TOKENS) - 1)
    try:
        report = decoder_memory_report(model_path, tokens)
    except Exception as exc:  # noqa: BLE001 - an estimate: the artifact passed parity, so say why and go on
        # onnxruntime's symbolic shape inference crashes on some graphs (PhiMoE, gpt-oss: a Sub whose output
        # it leaves without a shape, "object of type 'NoneType' has no len()").
        report = {"error": f"symbolic shape inference failed ({type(exc).__name__}: {first_line(exc, 200)})"}
    report["kv_cache_bytes_per_token"] = captured.kv.to_json()["bytes_per_token"]
    return report


def _lower_ir_version(model: ir.Model) -> None:
    # onnx.helper stamps the newest IR version it knows, which a released onnxruntime may not read yet
    # ("Unsupported model IR version: 14"). The opsets in use fix the IR version actually required.
    import onnx

    needed = onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()],
        ignore_unknown=True,
    )
    if needed < model.ir_version:
        model.ir_version = needed


def _opset_imports(model: ir.Model) -> dict[str, int]:
    return {domain or "ai.onnx": version for domain, version in model.opset_imports.items()}


def _require_runnable_on_ort(model: ir.Model, spec: str) -> None:
    """Refuse to publish what `luffy.load` would refuse: the same probe of the installed onnxruntime."""
    from ..errors import UnsupportedModelError
    from ..runtimes.ort_compat import ort_refusal

    reason = ort_refusal(_opset_imports(model), model.ir_version)
    if reason is not None:
        import onnxruntime

        raise UnsupportedModelError(f"{spec}: onnxruntime {onnxruntime.__version__} cannot run the compiled graph: {reason}")


def _require_loadable_on_ort(model_path: Path, spec: str) -> None:
    """Create an onnxruntime session on the staged graph, as luffy.load will: a graph ORT refuses (a cycle, a
    dangling input, a node its schema rejects) must not be published. The parity check does this already."""
    from ..errors import UnsupportedModelError
    from ..runtimes.ort_compat import import_onnxruntime, session_options

    ort = import_onnxruntime()
    options = session_options()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT's Fail/InvalidGraph/NotImplemented
        reason = first_line(exc, text=str(exc).replace(str(model_path), MODEL_FILE))
        raise UnsupportedModelError(f"{spec}: onnxruntime {ort.__version__} cannot load the compiled graph: {reason}") from None


def _max_seq_len(cfg: LuffyConfig, tm, captured) -> int | None:
    if captured.kind != CAUSAL_LM and (tm is None or tm.max_positions is None):
        return cfg.max_seq_len
    limit = tm.max_positions if tm is not None else None
    if cfg.max_seq_len is None:
        return limit or DEFAULT_MAX_SEQ_LEN
    if limit is not None and cfg.max_seq_len > limit:
        raise UsageError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's position limit {limit}")
    return cfg.max_seq_len


def _save_model(model: ir.Model, stage: Path, mode: str) -> bool:
    from ..errors import UnsupportedModelError

    try:
        weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        external = mode == "always" or (mode == "auto" and weight_bytes > EXTERNAL_DATA_BYTES)
        if external:
            ir.save(model, stage / MODEL_FILE, external_data=DATA_FILE)
        else:
            ir.save(model, stage / MODEL_FILE)
    except (ir.serde.SerdeError, TypeError, ValueError) as exc:  # a tensor or attribute ONNX cannot encode
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise UnsupportedModelError(f"cannot write the graph as ONNX: {type(root).__name__}: {root}") from exc
    return external


def _write_tokenizer(stage: Path, src, tm) -> tuple[list[str], dict | None]:
    """The tokenizer files written, and the manifest's ``chat_template`` record (None without a template)."""
    from .tokenizer_files import write_chat_template, write_tokenizer

    source_dir = tm.tokenizer_dir if tm is not None else (src.path.parent if src.kind == "onnx" else None)
    names = write_tokenizer(stage, tokenizer=tm.tokenizer if tm is not None else None, source_dir=source_dir)
    if tm is not None and tm.chat_template is not None:
        return names, write_chat_template(stage, template=tm.chat_template, special=tm.special_tokens)
    return names, write_chat_template(stage, source_dir) if source_dir is not None else None


def _text(value) -> str:
    # ONNX is proto2: protobuf hands back a string field that is not UTF-8 as bytes
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(
        f"{_text(n.domain)}::{_text(n.op_type)}" if n.domain not in ("", "ai.onnx") else _text(n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return dict(counts.most_common())


def parameter_count(model: ir.Model) -> int:
    """Weights the model holds, counted as the original matrices (a packed int4 MatMulNBits weight of
    K x N counts K*N, not its bytes; its scales and zero points are not parameters)."""
    quant_aux, total = set(), 0
    for node in model.graph:
        k, n = node.attributes.get("K"), node.attributes.get("N")
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and k is not None and n is not None:
            total += k.value * n.value if isinstance(k.value, int) and isinstance(n.value, int) else 0
            quant_aux.update(id(v) for v in node.inputs[1:] if v is not None)
        elif node.op_type in ("GatherBlockQuantized", "DequantizeLinear"):
            quant_aux.update(id(v) for v in node.inputs[1:] if v is not None)
    for value in model.graph.initializers.values():
        if id(value) not in quant_aux and value.const_value is not None:
            total += value.const_value.size
    return total


def _dtype_name(value: ir.Value) -> str:
    if value.dtype is None:
        return "unknown"
    try:
        return str(np.dtype(value.dtype.numpy()))
    except TypeError:  # ONNX types numpy has no dtype for (UNDEFINED, string in some versions): ONNX's own name
        return value.dtype.name.lower()


def io_signature(model: ir.Model) -> dict:
    def describe(value: ir.Value) -> dict:
        shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
        return {"name": _text(value.name), "dtype": _dtype_name(value), "shape": shape}

    return {"inputs": [describe(v) for v in model.graph.inputs], "outputs": [describe(v) for v in model.graph.outputs]}


def _dim_ranges(signature: dict, max_len: int | None, kind: str) -> dict:
    names = {d for io in signature.values() for v in io for d in (v["shape"] or []) if isinstance(d, str)}
    ranges = {name: {"min": 1, "max": None} for name in sorted(names)}
    if kind == CAUSAL_LM:
        ranges.update({
            "batch": {"min": 1, "max": None},
            "seq": {"min": 1, "max": max_len},
            "past": {"min": 0, "max": max_len - 1 if max_len else None},
            "total": {"min": 1, "max": max_len},
        })
        if "max_seq" in ranges:  # shared-buffer KV: the buffers' capacity, chosen per generate call
            ranges["max_seq"] = {"min": 1, "max": max_len}
    elif "seq" in ranges and max_len:
        ranges["seq"]["max"] = max_len
    return ranges


def _kv_json(captured, signature: dict) -> dict | None:
    if captured.kv is None:
        return None
    shared = any(v["name"] == "seqlens_k" for v in signature["inputs"])
    # shared: one buffer per layer and kind, bound as past and present (fuse-gqa); else present = past + new
    return {**captured.kv.to_json(), "mode": "shared-buffer" if shared else "concat"}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"luffy": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _manifest(cfg, src, tm, captured, model, max_len, tokenizer_files, external, report) -> dict:
    signature = io_signature(model)
    kind = captured.kind
    generation = dict(tm.generation) if tm is not None else {}
    if src.kind == "onnx":
        from .tokenizer_files import generation_ids_beside

        generation = generation_ids_beside(src.path)
    return {
        "format_version": FORMAT_VERSION,
        "state": STATE_READY,
        "kind": kind,
        "target": cfg.target,
        "precision": cfg.precision,
        "opt_level": cfg.opt_level,
        "options": cfg.to_json(),
        "versions": _versions(),
        "source": {**src.describe(), "architecture": tm.architecture if tm is not None else None},
        "model_file": MODEL_FILE,
        "external_data": DATA_FILE if external else None,
        "opset_imports": _opset_imports(model),
        "ir_version": model.ir_version,
        "io": signature,
        "dims": _dim_ranges(signature, max_len, kind),
        "max_seq_len": max_len,
        "kv_cache": _kv_json(captured, signature),
        "generation": generation,
        "tokenizer": "tokenizer.json" if "tokenizer.json" in tokenizer_files else None,
        # int8-dynamic with 8-bit weights is only correct where ORT's u8s8 kernels do not saturate (VNNI)
        **({"int8_reduce_range": _reduce_range(cfg)} if cfg.precision == "int8-dynamic" else {}),
        "report": report,
    }
