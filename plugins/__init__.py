"""Custom ops per target (TensorRT plugins, ORT custom ops) and their registration.

Empty until a target needs an op its runtime lacks; each plugin will be one file here.
"""
