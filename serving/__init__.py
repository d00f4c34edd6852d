"""Serving compiled artifacts: continuous batching over the runtime's KV slots, and an OpenAI-compatible server.

``Scheduler`` (scheduler.py) owns an Engine in one thread; ``server.build_app`` puts it behind FastAPI
(extra ``serve``). This package imports runtimes/, never compiler/: a serving machine needs neither torch,
transformers nor onnxscript.
"""
