"""What a compile tells you: ``compile_report`` (per-pass records, ops, parameters, precision), ``memory``
(activation memory by liveness), ``dump_ir`` (--dump-ir), ``inspect`` (`luffy inspect`)."""
