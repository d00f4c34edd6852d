"""Stage 1: what the MODEL argument names. ``resolve`` classifies it without loading anything;
``torch_model`` loads a zoo model, Hugging Face directory, factory or in-memory module as torch."""
