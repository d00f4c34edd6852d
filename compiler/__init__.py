"""The compile flow: capture, the pipeline driver, emit, the artifact and its manifest.

Submodules import torch lazily; ``luffy.compiler.artifact`` never does (the runtime reads manifests).
"""
