"""The TensorRT target: a portable graph TensorRT's ONNX parser reads, plugins where it lacks an op, profiles,
and a build where a builder and a GPU are present (see targets/__init__.py for what a target owns)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from ...errors import UsageError
from ...runtimes.manifest import STATE_NEEDS_BUILD
from ..capture.torch_export import CAPTURE_OPSET, ONNX_OPSET
from ..config import LuffyConfig
from .trt_build import ENGINE_FILE, build_in_directory, installed_tensorrt, operator_check_summary, require_builder
from .trt_profiles import optimization_profiles, trtexec_command

PORTABLE_OPS_SINCE = (10, 15)  # the first TensorRT whose parser has Attention, RMSNormalization, RotaryEmbedding


class TrtTarget:
    """TensorRT: a portable graph its parser reads, plugins where it lacks an op, profiles, and a build where a
    builder and a GPU are present (else the needs-build state `luffy build` finishes)."""

    name = "trt"

    def __init__(self, cfg: LuffyConfig):
        self.cfg = cfg.with_overrides(trt_version=_trt_version(cfg))
        self.operator_check = None
        if self.cfg.precision in ("int4", "int8") and self.capture_opset() < 21:
            raise UsageError(f"--precision {cfg.precision} for TensorRT {self.cfg.trt_version}: QDQ weights need blockwise "
                             f"DequantizeLinear (opset 21), which TensorRT's parser reads from 10.6; "
                             f"use --trt-version 10.6 or newer, or --precision fp16")
        self.builder = None

    def require_tools(self) -> None:
        """Fails fast, before minutes of capture, saying how to proceed: a build needs TensorRT's builder and a GPU."""
        if not self.cfg.defer_build:
            self.builder = require_builder()

    def capture_opset(self) -> int:
        from .trt_support import operator_list, version_tuple

        # TensorRT before 10.15 parses neither RMSNormalization nor RotaryEmbedding: those get a decomposed
        # graph at the highest opset their parser reads up to 22 (10.0-10.5: 20; 10.6-10.14: 22, which
        # int4/int8 need for blockwise DequantizeLinear), RMSNorm as a luffy plugin from 10.7 on, and
        # TensorRT's own fusions take the rest.
        if version_tuple(self.cfg.trt_version) < PORTABLE_OPS_SINCE:
            return max(ONNX_OPSET, min(22, operator_list(self.cfg.trt_version)[1]["opset_range"][1]))
        return CAPTURE_OPSET["trt"]

    def extra_steps(self) -> list:
        from ...passes.pipelines import plugin_steps
        from .trt_support import version_tuple

        cfg = self.cfg
        return plugin_steps("trt", cfg.opt_level, version_tuple(cfg.trt_version), cfg.disabled_passes)

    def check(self, model: ir.Model, spec: str, say: Callable[[str], None]) -> None:
        from .trt_support import check_graph, require_supported

        say(f"checking every node against TensorRT {self.cfg.trt_version}'s ONNX parser")
        self.operator_check = check_graph(model, self.cfg.trt_version)
        require_supported(self.operator_check, f"{spec} (legalized for --target trt)")

    def check_loadable(self, model_path: Path, spec: str, say: Callable[[str], None]) -> None:
        """Nothing here: the operator check stands for it; the engine build (now or by `luffy build`) parses."""

    def finish(self, stage: Path, manifest: dict, say: Callable[[str], None]) -> dict:
        manifest = _tensorrt_section(self.cfg, manifest, self.operator_check)
        if self.builder is not None:
            manifest = build_in_directory(stage, manifest, *self.builder, say=say)
        return manifest


def _trt_version(cfg: LuffyConfig) -> str:
    from .trt_support import known_versions, operator_list

    if cfg.trt_version is not None:
        operator_list(cfg.trt_version)  # validates the text and the major version
        return cfg.trt_version
    trt = installed_tensorrt()
    return trt.__version__ if trt is not None else known_versions()[-1]


def _tensorrt_section(cfg: LuffyConfig, manifest: dict, operator_check: dict) -> dict:
    """The needs-build state: profiles, the operator check, and the trtexec line that builds the engine."""
    from .trt_support import version_tuple

    profiles = optimization_profiles(manifest, cfg.max_batch, cfg.opt_batch, cfg.opt_seq_len)
    trt_fields = {f.name for f in fields(cfg) if f.metadata.get("group") == "trt"} - {"defer_build"}
    options = {k: v for k, v in cfg.to_json().items() if k in trt_fields}
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
