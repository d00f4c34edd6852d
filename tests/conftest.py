import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub


@pytest.fixture(scope="session")
def captures():
    """One CaptureCache for the session's shared builds: a zoo model is exported once, whatever it is compiled to."""
    import luffy

    return luffy.CaptureCache()


@pytest.fixture(scope="session")
def zoo_artifacts(tmp_path_factory, captures):
    """Each zoo model compiled once per session: name -> (Artifact, torch module)."""
    import luffy
    from luffy.models_zoo import ZOO

    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(name):
        if name not in cache:
            artifact = luffy.compile(name, output=root / name, captures=captures)
            cache[name] = (artifact, ZOO[name].build_model())
        return cache[name]

    return get


@pytest.fixture(scope="session")
def pydoc(zoo_artifacts):
    """llama-pydoc's default build, the serving tests' model (trained weights: greedy continuations are text)."""
    return zoo_artifacts("llama-pydoc")[0]


@pytest.fixture(scope="module")
def engine(pydoc):
    """That build loaded once per test module: what a served request is compared with (Engine.generate alone)."""
    return pydoc.load()


@pytest.fixture(scope="session")
def llama_verified(tmp_path_factory):
    """llama-tiny compiled once at the default level with --verify and --dump-ir: (artifact, dump directory)."""
    import luffy

    root = tmp_path_factory.mktemp("verify")
    artifact = luffy.compile("llama-tiny", output=root / "out", verify=True, dump_ir=root / "ir")
    return artifact, root / "ir"


@pytest.fixture(scope="session")
def family_artifact(tmp_path_factory):
    """Each random-weight family of tests/helpers.py saved as a HF directory and compiled from disk, once per
    session: family -> (Artifact, torch module)."""
    from luffy.tests.helpers import NAMED_FAMILIES, OTHER_FAMILIES, compiled_families

    return compiled_families(tmp_path_factory, {**NAMED_FAMILIES, **OTHER_FAMILIES})


@pytest.fixture(scope="session")
def pydoc_build(tmp_path_factory, captures):
    """llama-pydoc compiled once per session per set of options: ``pydoc_build(precision="int8", ...)`` -> Artifact.
    The quality gates' builds (all with --eval) and the speculative-decoding draft are the same compiles."""
    import luffy

    root, cache = tmp_path_factory.mktemp("pydoc-builds"), {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            cache[key] = luffy.compile("llama-pydoc", output=root / f"build-{len(cache)}", captures=captures, **options)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def pydoc_int8(pydoc_build):
    """llama-pydoc's int8 weight-only build: the speculative-decoding draft (with --eval, as the quality gate's
    int8 build, which it is: one compile serves both)."""
    from luffy.models_zoo.trained import heldout_text_path

    return pydoc_build(precision="int8", eval_file=str(heldout_text_path()))
