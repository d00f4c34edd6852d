"""The zoo's model with real weights: `llama-pydoc`, trained by luffy on the standard library's docstrings.

Quantization can only be judged on trained weights, so the weights (fp16 safetensors, ≈6.6 MB), the
held-out text for perplexity and a calibration text ship in models_zoo/weights/pydoc-llama/. Rebuild them
with ``python -m luffy.models_zoo.train_pydoc_llama`` (CPU, minutes).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceError

PYDOC_LLAMA_DIR = Path(__file__).with_name("weights") / "pydoc-llama"
HELDOUT_FILE = "heldout.txt"
# The model was trained on docstrings, not dialogues: its template turns a conversation into the docstring
# text it continues (each message a paragraph, the assistant's ended by <eos>), so chat requests exercise
# the template machinery and get docstring-like answers.
PYDOC_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ message['content'] }}{{ eos_token }}\n{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
)
CALIB_FILE = "calibration.txt"


def pydoc_llama():
    """Llama trained on Python's docstrings: 4 layers, hidden 256, 8 heads over 4 KV heads, byte tokens."""
    import torch
    from transformers import LlamaForCausalLM

    if not (PYDOC_LLAMA_DIR / "model.safetensors").is_file():
        raise SourceError(
            f"llama-pydoc: no weights in {PYDOC_LLAMA_DIR}; run python -m luffy.models_zoo.train_pydoc_llama"
        )
    return LlamaForCausalLM.from_pretrained(PYDOC_LLAMA_DIR, dtype=torch.float32, local_files_only=True).eval()


def heldout_text_path() -> Path:
    return PYDOC_LLAMA_DIR / HELDOUT_FILE


def calibration_text_path() -> Path:
    return PYDOC_LLAMA_DIR / CALIB_FILE
