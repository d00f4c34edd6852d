"""Custom ops per target: a TensorRT plugin (``tensorrt.plugin``) and its ONNX Runtime counterpart.

A plugin stands in for an op luffy emits that a supported TensorRT version's ONNX parser lacks. Each is
one file here holding one ``Plugin`` (see plugin.py): the rewrite rules that produce its node, its ONNX
function (how ONNX Runtime runs it) and its TensorRT implementation, registered only on demand. Adding
one is that file plus its entry in ``PLUGINS``. Nothing registers at import time.
"""

from __future__ import annotations

from ..errors import ArtifactError
from .plugin import DOMAIN, Plugin
from .rms_norm import RMS_NORM

PLUGINS: tuple[Plugin, ...] = (
    RMS_NORM,
)


def plugins_for_tensorrt(trt_version: tuple[int, ...]) -> list[Plugin]:
    """The plugins a graph for TensorRT ``trt_version`` uses.

    >>> [p.plugin_id for p in plugins_for_tensorrt((10, 8))]
    ['luffy::RMSNorm']
    >>> plugins_for_tensorrt((10, 15))
    []
    """
    return [p for p in PLUGINS if p.needed_for(trt_version)]


def plugin_for(domain: str, op_type: str) -> Plugin | None:
    return next((p for p in PLUGINS if (p.domain, p.name) == (domain, op_type)), None)


def register_tensorrt(plugin_ids) -> list[str]:
    """Register the TensorRT implementations of ``plugin_ids`` (before parsing or deserializing)."""
    registered = []
    for plugin_id in plugin_ids:
        domain, _, name = plugin_id.partition("::")
        plugin = plugin_for(domain, name)
        if plugin is None:
            raise ArtifactError(f"plugin {plugin_id} is not one this luffy has; known: "
                                f"{', '.join(p.plugin_id for p in PLUGINS)}")
        plugin.register_tensorrt()
        registered.append(plugin_id)
    return registered


__all__ = ["DOMAIN", "PLUGINS", "RMS_NORM", "Plugin", "plugin_for", "plugins_for_tensorrt", "register_tensorrt"]
