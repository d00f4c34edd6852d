"""Stage 2: the source as an onnx_ir graph. ``torch_export`` captures a torch module (torch.export, then
torch.onnx's dynamo exporter; a causal LM becomes one step graph with KV inputs); ``onnx_file`` reads an
existing .onnx file, refusing external data that escapes its directory."""
