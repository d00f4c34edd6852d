"""Tool calling: OpenAI's ``tools`` and ``tool_choice`` as a grammar in the model's own tool-call format, and the
output parsed back into ``message.tool_calls``.

The format comes from the artifact's chat template (as vLLM's ``--tool-call-parser`` names them):
  - ``hermes`` (Qwen2.5/3, Hermes and many fine-tunes; the template writes ``<tool_call>``): each call is
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
  - ``llama3_json`` (Llama 3.1-3.3; the template knows ``<|python_tag|>``): ``{"name": ..., "parameters": {...}}``,
    calls separated by ``; ``;
  - ``json``, the fallback for a template that does not render tools: luffy describes the tools in a system
    message and the model answers with a JSON array ``[{"name": ..., "arguments": {...}}]``.
``tool_choice`` decides the grammar: "none" has none (tools are still shown to the template); "auto" allows
free text, and once the model starts a call (the format's trigger: ``<tool_call>``, a leading ``{`` or ``[``) forces
a well-formed call to one of the tools; "required" and a named function force calls from the first token (one
call unless ``parallel_tool_calls``). Arguments follow each tool's ``parameters`` schema (llguidance's ``%json``
inside a Lark grammar, with the trigger as a lazy lexeme, as llguidance documents for tool calling).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import llguidance

from ..errors import UsageError
from ..runtimes.grammar import GrammarSpec, exact_dates, one_line

FORMATS = ("hermes", "llama3_json", "json")
# compact JSON, but with the one space after "," and ":" that models trained on json.dumps' output write
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}


class ToolError(UsageError):
    """A tools / tool_choice request luffy cannot honour; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def template_format(template_source: str | None) -> str:
    """The tool-call format a chat template's model was trained on, from what the template writes."""
    source = template_source or ""
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source:
        return "llama3_json"
    return "json"


def renders_tools(template_source: str | None) -> bool:
    """Whether the template shows the model its tools (otherwise luffy adds a system message that does)."""
    return bool(template_source) and re.search(r"\btools\b", template_source) is not None


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools ask of decoding: the format, the functions callable now (name -> parameters
    schema) and whether a call is forced."""

    format: str
    functions: dict
    forced: bool  # "required" or a named function: the output is tool calls only
    parallel: bool

    @property
    def arguments_key(self) -> str:
        return "parameters" if self.format == "llama3_json" else "arguments"

    def grammar(self) -> GrammarSpec:
        """The Lark grammar (with %json schemas) the output follows."""
        calls = " | ".join(f"call_{i}" for i in range(len(self.functions)))
        rules = [f"call_{i}: %json {json.dumps(self._call_schema(name, params))}"
                 for i, (name, params) in enumerate(self.functions.items())]
        return GrammarSpec("grammar", "\n".join(self._skeleton(calls) + rules), closes_json=self.forced)

    def _skeleton(self, calls: str) -> list[str]:
        """The format's Lark rules around the calls (``calls``: the alternatives over the call rules)."""
        if self.format == "hermes":
            wrapped = f'"<tool_call>\\n" ({calls}) "\\n</tool_call>"'
            if self.forced:
                return ["start: call" + (' ("\\n" call)*' if self.parallel else ""), f"call: {wrapped}"]
            # the trigger is a lazy lexeme: free text until the first <tool_call>, then a call is forced
            return ["start: " + ("auto_call*" if self.parallel else "auto_call?") + " TEXT", r"TEXT: /(.|\n)*/",
                    'head[lazy]: TEXT "<tool_call>"', f'auto_call: head "\\n" ({calls}) "\\n</tool_call>"']
        first = "{" if self.format == "llama3_json" else "["
        if self.format == "llama3_json":
            body = ['calls: call ("; " call)*' if self.parallel else "calls: call", f"call: {calls}"]
        else:
            body = ['calls: "[" call ' + ('(", " call)* ' if self.parallel else "") + '"]"', f"call: {calls}"]
        if self.forced:
            return ["start: calls", *body]
        # free text must not start with the call's first character, which commits the output to calls
        return ["start: PROSE | calls", *body, f"PROSE: /([^\\{first}](.|\\n)*)?/"]

    def _call_schema(self, name: str, params: dict) -> dict:
        return {"type": "object", "properties": {"name": {"const": name}, self.arguments_key: params},
                "required": ["name", self.arguments_key], "additionalProperties": False, "x-guidance": _CALL_JSON}


def plan(tools: list[dict] | None, tool_choice, parallel: bool, template_source: str | None) -> ToolPlan | None:
    """The ToolPlan of a request (None when it has no tools or tool_choice is "none"); ToolError names the field
    at fault. ``tools`` are OpenAI's ``{"type": "function", "function": {"name", "parameters", ...}}``."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") or {}
        name, params = function.get("name"), function.get("parameters") or {"type": "object", "properties": {}}
        if tool.get("type") != "function" or not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ToolError(f"tools[{i}]: a tool is {{'type': 'function', 'function': {{'name': ...}}}} with a name "
                            "of 1-64 letters, digits, '_', '.' or '-'", f"tools[{i}]")
        functions[name] = _checked_parameters(exact_dates(params), f"tools[{i}].function.parameters")
    choice = tool_choice or "auto"
    if choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        if wanted not in functions:
            raise ToolError(f"tool_choice names function {wanted!r}, which is not among the tools "
                            f"({', '.join(functions)})", "tool_choice")
        return ToolPlan(template_format(template_source), {wanted: functions[wanted]}, True, False)
    if choice not in ("auto", "required"):
        raise ToolError(f"tool_choice {choice!r}: expected none, auto, required or a named function", "tool_choice")
    return ToolPlan(template_format(template_source), functions, choice == "required", parallel)


def _checked_parameters(params, where: str) -> dict:
    if not isinstance(params, dict):
        raise ToolError(f"{where}: a JSON schema object, got {type(params).__name__}", where)
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(params))
    if error and not error.startswith("WARNING"):
        raise ToolError(f"{where}: {one_line(error)}", where)
    return params


def system_message(tools: list[dict]) -> dict:
    """The system message that shows the tools to a model whose template does not (the ``json`` format)."""
    listing = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    return {"role": "system", "content": f"You can call these functions: {listing}\nTo call functions, answer with "
                                         'only a JSON array of calls: [{"name": "...", "arguments": {...}}].'}


def parse(text: str, tool_plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished output in ``tool_plan``'s format; text that holds no complete call
    stays content."""
    calls, rest = _FORMAT_PARSERS[tool_plan.format](text)
    parsed = [_tool_call(c, tool_plan) for c in calls]
    if not calls or None in parsed:
        return text or None, []
    content = rest.strip()
    return content or None, parsed


def _hermes_calls(text: str) -> tuple[list[str], str]:
    pattern = re.compile(r"<tool_call>\n?(.*?)\n?</tool_call>", re.DOTALL)
    return pattern.findall(text), pattern.sub("", text)


def _json_values(text: str, opener: str) -> tuple[list, str]:
    """JSON values at the start of ``text`` (``opener`` first), separated by ``;``."""
    body = text.lstrip()
    if not body.startswith(opener):
        return [], text
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, at = decoder.raw_decode(body, at)
        except ValueError:
            return [], text
        values.append(value)
        at = len(body) - len(body[at:].lstrip().lstrip(";").lstrip())
    if opener == "[":
        return (values[0] if len(values) == 1 and isinstance(values[0], list) else []), ""
    return values, ""


_FORMAT_PARSERS = {
    "hermes": _hermes_calls,
    "llama3_json": lambda text: _json_values(text, "{"),
    "json": lambda text: _json_values(text, "["),
}


def _tool_call(call, tool_plan: ToolPlan) -> dict | None:
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except ValueError:
            return None
    if not isinstance(call, dict) or call.get("name") not in tool_plan.functions:
        return None
    arguments = call.get(tool_plan.arguments_key, {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
