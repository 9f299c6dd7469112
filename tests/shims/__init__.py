"""Test-environment shims for the detectron2 projects' packages (see README.md beside this file).

Only what makes an import succeed where this environment's detectron2 lacks its compiled ``_C``;
nothing here stands in for code that a test exercises or asserts on.
"""
import importlib
import sys

__all__ = ["install_project_shims"]

#: Modules of detectron2 that import its compiled ``_C`` at import time, and the shim module
#: that replaces each where ``_C`` is missing.
_SHIMS = {"detectron2.evaluation.fast_eval_api": f"{__name__}.fast_eval_api"}


def install_project_shims() -> None:
    """Make the imports in ``_SHIMS`` succeed: each real module where it imports, else its shim.

    Idempotent. Call before importing a project package (``import mask2former``).
    """
    for name, shim in _SHIMS.items():
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:  # detectron2 without its compiled _C
            sys.modules[name] = importlib.import_module(shim)
