"""Writing the artifact: ``artifact`` (the staged directory and its atomic publish), ``manifest`` (what the
runtime reads), ``tokenizer_files`` (tokenizer.json and the chat template)."""
