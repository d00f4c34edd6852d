"""The compiler: a model source in, an artifact directory out. Its sub-packages are the stages, in order:

    sources/   what the MODEL argument names (zoo, Hugging Face directory, .onnx, factory, module)
    capture/   the source as an onnx_ir graph: torch.export -> torch.onnx, or an .onnx file read safely
    stream/    the capture of a safetensors checkpoint from a few layers stamped across the depth, weights lazy
    (passes)   the graph passes and pipelines live in the top-level ``luffy.passes``
    quality/   parity against PyTorch, --verify after each pass, calibration and perplexity, `luffy verify`
    targets/   what ONNX Runtime and TensorRT each add (opset, plugins, legality check, engine build)
    emit/      the artifact directory: model files, tokenizer, manifest, the atomic publish
    report/    the compile report, activation memory, --dump-ir, `luffy inspect`

``compile.py`` is the flow between them (resolve -> capture -> passes -> check -> emit -> publish) and
``config.py`` the options. The --auto decider is above the compiler (``luffy.auto``). Submodules import torch
lazily; ``luffy.compiler.emit.artifact`` never does (the runtime reads manifests).
"""
