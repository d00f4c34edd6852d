"""The ONNX Runtime target: com.microsoft fusions, and a graph the installed onnxruntime must load before it
is published (see targets/__init__.py for what a target owns)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx_ir as ir
import onnxruntime

from ...errors import UnsupportedModelError, first_line
from ...runtimes.ort_compat import import_onnxruntime, ort_refusal, session_options
from ..capture.torch_export import CAPTURE_OPSET
from ..config import LuffyConfig
from ..emit.manifest import opset_imports

MODEL_FILE = "model.onnx"


class OrtTarget:
    """ONNX Runtime: the com.microsoft fusions, a graph the installed onnxruntime must load before it is published."""

    name = "ort"

    def __init__(self, cfg: LuffyConfig):
        self.cfg = cfg

    def capture_opset(self) -> int:
        return CAPTURE_OPSET["ort"]

    def extra_steps(self) -> list:
        return []

    def require_tools(self) -> None:
        """onnxruntime is a dependency of luffy itself: nothing to check before capture."""

    def check(self, model: ir.Model, spec: str, say: Callable[[str], None]) -> None:
        """Refuse to publish what `luffy.load` would refuse: the same probe of the installed onnxruntime."""
        reason = ort_refusal(opset_imports(model), model.ir_version)
        if reason is not None:
            raise UnsupportedModelError(f"{spec}: onnxruntime {onnxruntime.__version__} cannot run the compiled graph: {reason}")

    def check_loadable(self, model_path: Path, spec: str, say: Callable[[str], None]) -> None:
        """Create an onnxruntime session on the staged graph, as luffy.load will: a graph ORT refuses (a cycle, a
        dangling input, a node its schema rejects) must not be published. The parity check does this already."""
        say("loading the graph on onnxruntime")
        ort = import_onnxruntime()
        options = session_options()
        options.log_severity_level = 3
        try:
            ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT's Fail/InvalidGraph/NotImplemented
            reason = first_line(exc, text=str(exc).replace(str(model_path), MODEL_FILE))
            raise UnsupportedModelError(f"{spec}: onnxruntime {ort.__version__} cannot load the compiled graph: {reason}") from None

    def finish(self, stage: Path, manifest: dict, say: Callable[[str], None]) -> dict:
        return manifest
