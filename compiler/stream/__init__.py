"""The streamed compile of Hugging Face safetensors checkpoints: memory bounded by one layer, not the model.

capture.py   the flow: skeleton and checkpoint checks, template export, stamp, lazy weights, exporter optimizer
skeleton.py  models with zero-byte parameters: names, shapes, ties, layer kinds, the template's depth
checkpoint.py  the safetensors index, its checks, and lazy tensors read one at a time
stamp.py     a reduced-depth export's layers stamped across the model's depth
lazy.py      weight transforms applied when a tensor is written (derived lazy tensors)

docs/large-models.md describes the design and what was measured; regions.py, parity.py, reference.py, quality.py and
calibration.py run the checks, --eval and GPTQ one region at a time.
"""
