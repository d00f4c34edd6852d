"""A serving process loads and runs an ORT artifact with torch, transformers and onnxscript impossible to import.

That is what `pip install luffy` without extras gives a serving machine: the package root is lazy, and
the runtime never imports the compiler.
"""

import json
import subprocess
import sys
import textwrap

BLOCKER = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnxscript"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Blocked())
"""


def test_runtime_never_imports_torch_transformers_or_onnxscript(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    expected = artifact.load().generate([[256, 1, 2]], max_new_tokens=8, eos_token_id=None).tolist()
    script = BLOCKER + textwrap.dedent(
        """
        import json
        import luffy
        engine = luffy.load(sys.argv[1])
        out = engine.generate([[256, 1, 2]], max_new_tokens=8, eos_token_id=None)
        text = engine.generate_text("hi", max_new_tokens=2)
        from luffy.serving.requests import SamplingParams
        from luffy.serving.scheduler import Scheduler
        from luffy.serving.server import build_app  # the HTTP layer imports without the compiler too
        scheduler = Scheduler(engine).start()
        served = scheduler.generate([256, 1, 2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        scheduler.stop()
        assert served.token_ids == out[0, 3:].tolist()
        loaded = sorted(m for m in sys.modules if m.startswith("luffy.compiler") or m.startswith("luffy.passes"))
        print(json.dumps({"ids": out.tolist(), "torch": "torch" in sys.modules, "compiler": loaded}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(artifact.path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"ids": expected, "torch": False, "compiler": []}


def test_the_cli_runs_and_inspects_an_artifact_without_the_compile_extras(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    script = BLOCKER + "from luffy.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    ran = subprocess.run([sys.executable, "-c", script, "run", str(artifact.path), "--input-ids", "256,1,2",
                          "--max-new-tokens", "4", "--no-eos", "--json"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert len(json.loads(ran.stdout)["output_ids"]) == 4
    inspected = subprocess.run([sys.executable, "-c", script, "inspect", str(artifact.path), "--json"],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["kind"] == "causal-lm"
    compiled = subprocess.run([sys.executable, "-c", script, "compile", "llama-tiny", "-o", "unused"],
                              capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 8, compiled.stderr  # BackendUnavailableError: the compiler needs them, and says so
    assert compiled.stderr.strip() == ("luffy: error: compiling needs the 'compile' extra (torch, transformers, "
                                       "onnxscript cannot be imported here): pip install 'luffy[compile]' (with "
                                       "torch's CPU wheel first on a machine without a GPU)")
