"""Patterns a TensorRT version's parser has no op for become luffy plugin nodes (plugins/).

Each plugin brings its own rewrite rules; this pass applies them and gives the model the ONNX function
of every plugin op it now holds, so ONNX Runtime (parity, ``luffy.load(..., runtime="ort")``) runs the
same graph TensorRT parses. The report records matches per plugin, and why a rule did not match.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet

from .rule_pass import RulePass


class UsePlugins(RulePass):
    def __init__(self, plugins):
        super().__init__(RewriteRuleSet([rule for p in plugins for rule in p.rules()]))
        self.plugins = plugins

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        used = {}
        for node in model.graph:
            for plugin in self.plugins:
                if (node.domain, node.op_type) == (plugin.domain, plugin.name):
                    used[plugin.plugin_id] = used.get(plugin.plugin_id, 0) + 1
        for plugin in self.plugins:
            if plugin.plugin_id in used:
                plugin.attach_function(model)
        self.stats["plugins"] = used
        return result


def use_plugins(plugins) -> UsePlugins:
    return UsePlugins(list(plugins))
