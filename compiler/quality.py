"""What a reduced-precision compile needs around its passes: GPTQ calibration statistics before, and
perplexity of the fp32 model and of the emitted artifact (--eval) after."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from ..errors import UsageError
from .calibration import WINDOW
from .config import WEIGHT_ONLY, LuffyConfig
from .sources import CAUSAL_LM

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


class QualityMeasure:
    """Calibration for GPTQ and perplexity before/after, on the token windows of --calib / --eval."""

    def __init__(self, cfg: LuffyConfig, src, tm, captured, max_len, say, streamed: bool = False):
        self.cfg, self.src, self.tm, self.captured, self.say = cfg, src, tm, captured, say
        self.streamed = streamed  # the weights are in the checkpoint: graphs are run region by region (stream/)
        self.window = min(WINDOW, max_len) if max_len else WINDOW
        self.reference_ppl = None
        self.reference_kind = None
        self._tokenizer = None

    def _windows(self, path: str, flag: str, limit=None):
        from .calibration import load_tokenizer, token_windows

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.src, self.tm)
        return token_windows(path, self._tokenizer, self.window, limit, flag)

    def _require_decoder(self, flag: str):
        if self.captured.kind != CAUSAL_LM:
            raise UsageError(f"{flag} measures a causal LM on token windows; this model is a {self.captured.kind}")

    def measure_reference(self, fp32_model: ir.Model) -> None:
        """Perplexity of the fp32 model: PyTorch when there is a module, else the optimized fp32 graph."""
        if not self.cfg.eval_file:
            return
        self._require_decoder("--eval")
        from .calibration import graph_perplexity, torch_perplexity

        windows, prefix = self._windows(self.cfg.eval_file, "--eval")
        self.say("measuring fp32 perplexity")
        if self.streamed:
            from .stream.quality import region_perplexity
            from .stream.regions import RegionRunner

            self.reference_ppl = region_perplexity(RegionRunner(fp32_model), windows, prefix, self.say)
            self.reference_kind = "optimized fp32 graph, region by region"
        elif self.tm is not None:
            self.reference_ppl, self.reference_kind = torch_perplexity(self.tm.module, windows, prefix), "pytorch fp32"
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="luffy-eval-") as tmp:
                ir.save(fp32_model, Path(tmp) / MODEL_FILE, external_data=DATA_FILE)
                self.reference_ppl = graph_perplexity(Path(tmp) / MODEL_FILE, windows, prefix)
            self.reference_kind = "optimized fp32 graph"

    def weights_for(self, model: ir.Model):
        """The precision stage's quantization spec for ``model`` (the fused fp32 graph), after measuring that
        graph's reference perplexity for --eval: both need the model before it is quantized."""
        self.measure_reference(model)
        return self.weight_spec(model)

    def weight_spec(self, model: ir.Model):
        if self.cfg.precision not in WEIGHT_ONLY:
            return None
        from ..passes.quantize_weights import WeightQuantization

        hessians = {}
        if self.cfg.calib:
            self._require_decoder("--calib")
            from .calibration import MAX_CALIB_WINDOWS, collect_hessians

            windows, _ = self._windows(self.cfg.calib, "--calib", MAX_CALIB_WINDOWS)
            if self.streamed:  # each layer's statistics when its weights are written (stream/calibration.py)
                from .stream.calibration import LayerHessians

                hessians = LayerHessians(model, windows, self.say)
            else:
                self.say(f"collecting GPTQ statistics on {len(windows)} calibration windows")
                hessians = collect_hessians(model, windows, self.say)
        bits = 4 if self.cfg.precision == "int4" else 8
        return WeightQuantization(
            bits=bits, block_size=self.cfg.block_size, accuracy_level=self.cfg.accuracy_level,
            lm_head_bits=bits, quantize_embeddings=True, hessians=hessians,
        )

    def evaluate(self, model_path: Path) -> dict:
        self._require_decoder("--eval")
        from .calibration import graph_perplexity, torch_perplexity

        windows, prefix = self._windows(self.cfg.eval_file, "--eval")
        if self.reference_ppl is None and not self.streamed:  # fp32 compile: the reference is the module itself
            self.say("measuring fp32 perplexity")
            if self.tm is not None:
                self.reference_ppl, self.reference_kind = torch_perplexity(self.tm.module, windows, prefix), "pytorch fp32"
        self.say(f"measuring {self.cfg.precision} perplexity")
        if self.streamed:
            from .stream.quality import region_perplexity
            from .stream.regions import RegionRunner

            ppl = region_perplexity(RegionRunner.from_artifact(model_path), windows, prefix, self.say)
            if self.reference_ppl is None:  # an fp32 compile: its own graph, held to PyTorch by the parity check
                self.reference_ppl, self.reference_kind = ppl, "this fp32 artifact (parity-checked against PyTorch)"
        else:
            ppl = graph_perplexity(model_path, windows, prefix)
        ref = self.reference_ppl
        return {
            "eval_file": self.cfg.eval_file, "windows": len(windows), "window_tokens": self.window,
            "tokens_scored": sum(len(w) - max(prefix, 1) for w in windows),
            "reference": self.reference_kind, "perplexity_reference": ref, "perplexity": ppl,
            "perplexity_increase_pct": None if ref is None else 100.0 * (ppl / ref - 1.0),
        }
