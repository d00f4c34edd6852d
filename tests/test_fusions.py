"""Each fusion pass: the graph after it (op counts), a graph it must not touch, numeric parity on ORT.

Graphs come from real torch modules exported with torch.onnx (what luffy captures), and parity is measured
against the unfused graph on ONNX Runtime with its own graph optimizations off, so ORT's fusions cannot
hide a wrong rewrite.
"""

import math

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from luffy.passes.fuse_attention import fuse_mha, fuse_sdpa, lower_sdpa
from luffy.passes.fuse_gelu import fuse_gelu
from luffy.passes.fuse_rms_norm import fuse_rms_norm
from luffy.passes.fuse_rotary import fuse_rotary
from luffy.passes.fuse_skip_norm import fuse_skip_norm

from .graphs import op_counts


def export(module, *args) -> ir.Model:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module.eval(), args, dynamo=True, opset_version=20, verbose=False).model


def run(model: ir.Model, *args) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})


def apply(model: ir.Model, *passes):
    fused = ir.from_proto(ir.to_proto(model))  # a copy: the passes work in place
    counts = []
    for p in passes:
        fused = p(fused).model
        counts.append(p.stats["matches"])
    from onnx_ir.passes.common import InlinePass, RemoveUnusedNodesPass

    fused = InlinePass()(fused).model
    fused = RemoveUnusedNodesPass()(fused).model
    return fused, counts


def assert_parity(before: ir.Model, after: ir.Model, *args, atol=1e-5):
    for got, want in zip(run(after, *args), run(before, *args), strict=True):
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim=32, axis=-1):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.axis = axis

    def forward(self, x):
        variance = x.pow(2).mean(self.axis, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


def test_rms_norm():
    x = torch.randn(2, 5, 32)
    model = export(RMSNorm(), x)
    fused, (count,) = apply(model, fuse_rms_norm())
    assert count == 1
    assert op_counts(fused, subgraphs=True) == {"SimplifiedLayerNormalization": 1}
    assert_parity(model, fused, x)


def test_rms_norm_over_another_axis_is_untouched():
    x = torch.randn(4, 32, 32)

    class OverRows(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)

    model = export(OverRows(), x)
    p = fuse_rms_norm()
    fused, (count,) = apply(model, p)
    assert count == 0 and op_counts(fused, subgraphs=True) == op_counts(model, subgraphs=True)
    assert p.stats["not_matched"], "a refusal comes with a reason"


class ResidualNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = RMSNorm()

    def forward(self, x, y):
        h = x + y
        return self.norm(h), h


def test_skip_norm():
    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    model = export(ResidualNorm(), x, y)
    fused, counts = apply(model, fuse_rms_norm(), fuse_skip_norm())
    assert counts == [1, 1]
    assert op_counts(fused, subgraphs=True) == {"SkipSimplifiedLayerNormalization": 1}
    assert_parity(model, fused, x, y)


def test_skip_norm_without_a_norm_is_untouched():
    class AddThenScale(torch.nn.Module):
        def forward(self, x, y):
            return (x + y) * 2.0

    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    model = export(AddThenScale(), x, y)
    fused, (count,) = apply(model, fuse_skip_norm())
    assert count == 0 and op_counts(fused, subgraphs=True) == op_counts(model, subgraphs=True)


class Rotary(torch.nn.Module):
    """Rotary as transformers 4.x Llama wrote it: cos/sin from inv_freq[None, :, None] @ position_ids."""

    def __init__(self, head_dim=16):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
        self.half = head_dim // 2

    def forward(self, q, k, position_ids):
        freqs = (self.inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]

        def rotate_half(x):
            return torch.cat((-x[..., self.half:], x[..., : self.half]), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rotary_inputs():
    return torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.arange(5).expand(2, 5)


def test_rotary():
    args = _rotary_inputs()
    model = export(Rotary(), *args)
    p = fuse_rotary()
    fused, (count,) = apply(model, p)
    assert count == 2 and p.stats["rotate_half_recognised"] == 2
    assert op_counts(fused, subgraphs=True)["RotaryEmbedding"] == 2 and op_counts(fused, subgraphs=True)["Neg"] == 0  # rotate-half is gone
    assert_parity(model, fused, *args)


class Llama5Rotary(torch.nn.Module):
    """transformers 5's Llama rotary, whose cos/sin export as a broadcast Mul (luffy's OuterProductCosSin)."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16))

    def forward(self, q, k, position_ids):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = self.rope(q, position_ids)
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_transformers5_llama_rotary():
    args = _rotary_inputs()
    model = export(Llama5Rotary(), *args)
    model.metadata_props["luffy.max_seq_len"] = "64"  # set by the compiler from the artifact's limit
    p = fuse_rotary()
    fused, (count,) = apply(model, p)
    assert count == 2 and op_counts(fused, subgraphs=True)["RotaryEmbedding"] == 2 and op_counts(fused, subgraphs=True)["Neg"] == 0
    cache = next(n for n in fused.graph if n.op_type == "RotaryEmbedding").inputs[2]
    assert cache.const_value is not None and cache.shape[0] == 64  # a constant table for positions 0..63
    assert_parity(model, fused, *args)


def test_rotary_without_a_cache_length_is_left_whole_and_explained():
    args = _rotary_inputs()
    model = export(Llama5Rotary(), *args)  # no luffy.max_seq_len: the table size is unknown
    p = fuse_rotary()
    fused, (count,) = apply(model, p)
    assert count == 0 and p.stats["rotate_half_recognised"] == 2
    # the recognised intermediate nodes inline back to the original ops (plus their Constant literals,
    # which the pipeline lifts into initializers)
    assert +(op_counts(fused, subgraphs=True) - op_counts(model, subgraphs=True)) == {"Constant": 10} and not +(op_counts(model, subgraphs=True) - op_counts(fused, subgraphs=True))
    assert "luffy.max_seq_len" in p.stats["not_matched"][0]["reason"]
    assert_parity(model, fused, *args)


def test_rotate_half_without_rotary_is_untouched():
    class RotateHalfOnly(torch.nn.Module):
        def forward(self, x):
            a, b = x[..., :8], x[..., 8:]
            return torch.cat((-b, a), dim=-1)

    x = torch.randn(2, 4, 5, 16)
    model = export(RotateHalfOnly(), x)
    fused, (count,) = apply(model, fuse_rotary())
    assert count == 0 and op_counts(fused, subgraphs=True) == op_counts(model, subgraphs=True)


class ErfGelu(torch.nn.Module):
    def __init__(self, half=0.5):
        super().__init__()
        self.half = half

    def forward(self, x):
        # the association onnxscript's erf rule is written for: x * (0.5 * (erf(x / sqrt 2) + 1))
        return x * (self.half * (torch.erf(x / math.sqrt(2.0)) + 1.0))


def test_gelu():
    x = torch.randn(3, 64)
    model = export(ErfGelu(), x)
    fused, (count,) = apply(model, fuse_gelu())
    assert count == 1 and op_counts(fused, subgraphs=True) == {"Gelu": 1}  # com.microsoft Gelu
    assert_parity(model, fused, x)


def test_gelu_with_another_constant_is_untouched():
    x = torch.randn(3, 64)
    model = export(ErfGelu(half=0.4), x)
    fused, (count,) = apply(model, fuse_gelu())
    assert count == 0 and op_counts(fused, subgraphs=True) == op_counts(model, subgraphs=True)


class Attention(torch.nn.Module):
    """Eager attention over a KV cache, the shape every decoder layer exports to."""

    def __init__(self, heads=4, dim=64, reshape_to_2d=False):
        super().__init__()
        self.heads, self.dim, self.reshape_to_2d = heads, dim, reshape_to_2d

    def forward(self, q, k, v, past_k, past_v):
        b, s, _ = q.shape
        split = lambda t: t.reshape(b, -1, self.heads, self.dim // self.heads).transpose(1, 2)  # noqa: E731
        key = torch.cat([past_k, split(k)], dim=-2)  # as transformers' DynamicCache concatenates
        value = torch.cat([past_v, split(v)], dim=-2)
        scores = split(q) @ key.transpose(2, 3) / math.sqrt(self.dim // self.heads)
        out = torch.softmax(scores, dim=-1) @ value
        out = out.transpose(1, 2)
        out = out.reshape(b * s, self.dim) if self.reshape_to_2d else out.reshape(b, s, self.dim)
        return out, key, value


def _attention_inputs():
    return (torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 64),
            torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16))


def test_attention_to_multi_head_attention():
    args = _attention_inputs()
    model = export(Attention(), *args)
    fused, counts = apply(model, fuse_sdpa(), fuse_mha(), lower_sdpa())
    assert counts == [1, 1, 0]
    assert op_counts(fused, subgraphs=True)["MultiHeadAttention"] == 1 and op_counts(fused, subgraphs=True)["Softmax"] == 0
    assert_parity(model, fused, *args)


def test_attention_reshaped_to_2d_is_not_absorbed():
    # GPT-2's form: luffy's MHA rule must refuse (onnxscript's would emit an invalid model), and the bare
    # SDPA is still lowered on its own.
    args = _attention_inputs()
    model = export(Attention(reshape_to_2d=True), *args)
    mha = fuse_mha()
    fused, counts = apply(model, fuse_sdpa(), mha, lower_sdpa())
    assert counts == [1, 0, 1]
    assert any("rank-3" in r["reason"] for r in mha.stats["not_matched"])
    assert_parity(model, fused, *args)


def test_gpt2_tanh_gelu():
    from transformers.activations import NewGELUActivation

    x = torch.randn(3, 64)
    model = export(NewGELUActivation(), x)
    fused, (count,) = apply(model, fuse_gelu())
    assert count == 1 and op_counts(fused, subgraphs=True) == {"FastGelu": 1}  # com.microsoft FastGelu
    assert_parity(model, fused, x)


def test_tanh_gelu_with_another_cubic_coefficient_is_untouched():
    class NotGelu(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.04 * torch.pow(x, 3.0))))

    x = torch.randn(3, 64)
    model = export(NotGelu(), x)
    fused, (count,) = apply(model, fuse_gelu())
    assert count == 0 and op_counts(fused, subgraphs=True) == op_counts(model, subgraphs=True)
