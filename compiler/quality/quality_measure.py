"""What a reduced-precision compile needs around its passes: GPTQ calibration statistics before, and
perplexity of the fp32 model and of the emitted artifact (--eval) after."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx_ir as ir

from ...errors import UsageError
from ...passes.gptq import SharedFactors
from ...passes.quantize_weights import WeightQuantization
from ...passes.matmul_packing import FLOAT_WEIGHTS
from ...runtimes.batch_invariance import nbits_batch_invariant
from ...runtimes.cpu_features import weight_kernels
from ..config import CALIBRATED_KV, WEIGHT_ONLY, LuffyConfig
from ..sources.resolve import CAUSAL_LM
from ..stream.calibration import LayerHessians, layer_kv_ranges
from ..stream.quality import region_perplexity
from ..stream.regions import RegionRunner
from .calibration import (
    MAX_CALIB_WINDOWS,
    WINDOW,
    collect_hessians,
    collect_kv_ranges,
    graph_perplexity,
    load_tokenizer,
    token_windows,
    torch_perplexity,
)

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
        windows, prefix = self._windows(self.cfg.eval_file, "--eval")
        self.say("measuring fp32 perplexity")
        if self.streamed:
            self.reference_ppl = region_perplexity(RegionRunner(fp32_model), windows, prefix, self.say)
            self.reference_kind = "optimized fp32 graph, region by region"
        elif self.tm is not None:
            self.reference_ppl, self.reference_kind = torch_perplexity(self.tm.module, windows, prefix), "pytorch fp32"
        else:
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
        hessians = {}
        if self.cfg.calib:
            self._require_decoder("--calib")
            windows, _ = self._windows(self.cfg.calib, "--calib", MAX_CALIB_WINDOWS)
            if self.streamed:  # each layer's statistics when its weights are written (stream/calibration.py)
                hessians = LayerHessians(model, windows, self.say)
            else:
                self.say(f"collecting GPTQ statistics on {len(windows)} calibration windows")
                hessians = SharedFactors(collect_hessians(model, windows, self.say))  # Q, K, V: one factor
        bits = 4 if self.cfg.precision == "int4" else 8
        block, accuracy, chosen_for = kernel_choice(self.cfg, model, bits)
        return WeightQuantization(
            # int8 embeddings too: a tied table is read by the gather and the head, and neither may stay fp32 at
            # vocab x hidden (issue 21)
            bits=bits, block_size=block, accuracy_level=accuracy, lm_head_bits=self.cfg.lm_head_bits or bits,
            quantize_embeddings=True,
            # measured on llama-pydoc at block 128: int8 symmetric +0.007 % perplexity (asymmetric +0.021 %) with
            # no zero points to store or read; int4 asymmetric and clipped +0.45 % (symmetric +0.61 %)
            symmetric=bits == 8, clip_search=bits == 4 and not hessians, chosen_for=chosen_for, hessians=hessians,
        )

    def kv_ranges_for(self, model: ir.Model) -> dict:
        """Per layer the largest |key| and |value| per channel on --kv-calib (or --calib), measured on ``model`` (the
        graph after the precision stage): an int8/int4 KV cache's scales. A streamed compile runs it region by
        region (stream/calibration.py), the same maxima. Called for an fp16 cache too (None): with fp32 weights
        ``model`` is --eval's fp32 reference, which a streamed compile has no PyTorch module to measure."""
        if self.reference_ppl is None:
            self.measure_reference(model)
        if self.cfg.kv_cache_dtype not in CALIBRATED_KV:
            return None
        self._require_decoder("--kv-cache-dtype")
        source, flag = (self.cfg.kv_calib, "--kv-calib") if self.cfg.kv_calib else (self.cfg.calib, "--calib")
        windows, _ = self._windows(source, flag, MAX_CALIB_WINDOWS)
        self.say(f"calibrating the {self.cfg.kv_cache_dtype} KV cache on {len(windows)} windows")
        if self.streamed:  # the weights are in the checkpoint: run the graph one region at a time
            return layer_kv_ranges(model, windows, self.say)
        return collect_kv_ranges(model, windows, self.say)

    def evaluate(self, model_path: Path) -> dict:
        self._require_decoder("--eval")
        windows, prefix = self._windows(self.cfg.eval_file, "--eval")
        if self.reference_ppl is None and not self.streamed:  # fp32 compile: the reference is the module itself
            self.say("measuring fp32 perplexity")
            if self.tm is not None:
                self.reference_ppl, self.reference_kind = torch_perplexity(self.tm.module, windows, prefix), "pytorch fp32"
        self.say(f"measuring {self.cfg.precision} perplexity")
        if self.streamed:
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


def kernel_choice(cfg, model: ir.Model, bits: int = 4) -> tuple[int, int, dict | None]:
    """(block size, accuracy level, what they were chosen for) of a weight-only compile: the options when given,
    else this CPU's (runtimes/cpu_features.weight_kernels), the block lowered to one that divides every weight's
    K (GPTQ and ORT's QMoE need whole blocks), and with --batch-invariant to one whose kernels compute a row the
    same in any batch here (runtimes/batch_invariance.py). The TensorRT target keeps block 32 (its QDQ int4
    weights)."""
    plan = weight_kernels(bits=bits) if cfg.target == "ort" else {"cpu": "tensorrt", "block_size": 32, "accuracy_level": 4,
                                                          "why": "TensorRT's int4 weight blocks"}
    accuracy = plan["accuracy_level"] if cfg.accuracy_level is None else cfg.accuracy_level
    block = cfg.block_size or plan["block_size"]
    if cfg.block_size is None:
        ks = {n.inputs[1].const_value.shape[0] for n in model.graph if n.op_type == "MatMul" and len(n.inputs) > 1
              and n.inputs[1] is not None and n.inputs[1].const_value is not None
              and len(n.inputs[1].const_value.shape) == 2 and n.inputs[1].dtype in FLOAT_WEIGHTS}
        fits = [b for b in (block, 64, 32, 16) if b <= block and all(k % b == 0 for k in ks)]
        if cfg.batch_invariant and cfg.target == "ort":
            fits = _invariant_blocks(fits, bits, accuracy, plan)
            plan = {**plan, "block_size": fits[0], "why": f"{plan['why']}; --batch-invariant: block {fits[0]}, the "
                    "largest that computes a row the same in any batch on this CPU (runtimes/batch_invariance.py)"}
        block = next(iter(fits), block)
    if cfg.block_size is not None and cfg.accuracy_level is not None:
        return block, accuracy, None
    why = plan["why"] if block == plan["block_size"] else f"{plan['why']}; {block}: the largest dividing every K"
    return block, accuracy, {**plan, "block_size": block, "why": why}


def _invariant_blocks(blocks: list[int], bits: int, accuracy: int, plan: dict) -> list[int]:
    """The blocks among ``blocks`` whose MatMulNBits (symmetric at 8 bits, as quantize-weights writes them) is
    batch-invariant on this CPU, largest first; none is a one-line error naming the CPU."""
    invariant = [b for b in blocks if nbits_batch_invariant(bits, b, accuracy, bits == 8)]
    if not invariant:
        raise UsageError(f"--batch-invariant: no int{bits} block ({', '.join(map(str, blocks))}) at accuracy level "
                         f"{accuracy} computes a row the same in any batch on this CPU ({plan['cpu']}); drop "
                         "--batch-invariant or try --accuracy-level")
    return invariant
