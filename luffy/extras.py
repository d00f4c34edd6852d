"""Optional halves of luffy and the extras that install them, with one clear error when one is missing.

A serving machine installs luffy without extras; reaching for the compiler there should say which extra
to install, not fail deep inside an import chain.
"""

from __future__ import annotations

import importlib

from .errors import BackendUnavailableError

COMPILE_PACKAGES = ("torch", "transformers", "onnxscript")
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "jinja2")
RAY_PACKAGES = ("ray", "ray.serve", "ray.serve.request_router")


def import_compiler(module: str):
    """Import ``luffy.compiler.<module>`` (or another compile-side module), or say which packages are missing.

    >>> import_compiler("luffy.compiler.compile").compile   # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        missing = [name for name in COMPILE_PACKAGES if not _importable(name)]
        if not missing:
            raise
        raise BackendUnavailableError(
            f"compiling needs the 'compile' extra ({', '.join(missing)} cannot be imported here): "
            "pip install 'luffy[compile]' (with torch's CPU wheel first on a machine without a GPU)"
        ) from None


def require_serve_extra() -> None:
    """Say which packages of the 'serve' extra are missing, before `luffy serve` or `luffy bench serve` starts."""
    missing = [name for name in SERVE_PACKAGES if not _importable(name)]
    if missing:
        raise BackendUnavailableError(f"luffy serve needs the 'serve' extra ({', '.join(missing)} not installed): "
                                      "pip install 'luffy[serve]'")


def require_ray_extra() -> None:
    """Say that the 'ray' extra is missing, before `luffy serve --replicas` starts anything."""
    missing = [name for name in RAY_PACKAGES if not _importable(name)]
    if missing:
        raise BackendUnavailableError(f"luffy serve --replicas/--ray-address runs on Ray Serve: the 'ray' extra "
                                      f"({', '.join(missing)} not installed): pip install 'luffy[ray]'")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
