"""A serving process loads and runs an ORT artifact with torch impossible to import."""

import json
import subprocess
import sys
import textwrap


def test_runtime_never_imports_torch(zoo_artifacts):
    artifact, _ = zoo_artifacts("llama-tiny")
    expected = artifact.load().generate([[256, 1, 2]], max_new_tokens=8, eos_token_id=None).tolist()
    script = textwrap.dedent(
        """
        import importlib.abc, json, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"{name} is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        import luffy
        engine = luffy.load(sys.argv[1])
        out = engine.generate([[256, 1, 2]], max_new_tokens=8, eos_token_id=None)
        text = engine.generate_text("hi", max_new_tokens=2)
        print(json.dumps({"ids": out.tolist(), "torch": "torch" in sys.modules}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(artifact.path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"ids": expected, "torch": False}
