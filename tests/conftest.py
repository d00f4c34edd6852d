import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub


@pytest.fixture(scope="session")
def zoo_artifacts(tmp_path_factory):
    """Each zoo model compiled once per session: name -> (Artifact, torch module)."""
    import luffy
    from luffy.models_zoo import ZOO

    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(name):
        if name not in cache:
            artifact = luffy.compile(name, output=root / name)
            cache[name] = (artifact, ZOO[name].build_model())
        return cache[name]

    return get
