"""Graph passes on onnx_ir models, and the explicit per-target, per-level pipelines that order them.

Nothing here imports a runtime; passes take an ``onnx_ir.Model`` and return ``ir.passes.PassResult``.
"""
