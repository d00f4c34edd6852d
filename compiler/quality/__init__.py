"""Checks and measurements of what the compiler produced: ``parity`` (the emitted graph on ONNX Runtime against
PyTorch, every compile), ``verify`` (--verify: after every pass), ``calibration`` and ``quality_measure``
(GPTQ statistics, perplexity before/after), ``step_io`` (running a decoder step graph), ``artifact_check``
(`luffy verify ARTIFACT`)."""
