"""Loads the compiled extension fastcascade._C, with errors that say how to fix a missing or stale build."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."
_PACKAGE = __package__.rpartition(".")[0]  # "fastcascade"


def load():
    """(the _C module, the build-info module) of this installation; ImportError naming the fix otherwise."""
    try:
        build_info = importlib.import_module(f"{_PACKAGE}._build_info")
    except ImportError:
        raise ImportError(
            "fastcascade._C is not built: install the package (`pip install --no-build-isolation .`) and "
            "import it from outside the source tree."
        ) from None
    if build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastcascade._C was built for torch {build_info.TORCH_VERSION} but torch {torch.__version__} is "
            f"installed. Rebuild fastcascade against this torch: {REBUILD}"
        )
    if importlib.util.find_spec(f"{_PACKAGE}._C") is None:
        folder = os.path.dirname(os.path.dirname(__file__))
        raise ImportError(
            f"fastcascade._C is not built next to {folder}: when that is the source tree, "
            "import the installed package from elsewhere, or build in place (python setup.py build_ext --inplace)."
        )
    try:
        ext = importlib.import_module(f"{_PACKAGE}._C")
    except ImportError as e:
        raise ImportError(f"fastcascade._C failed to load ({e}). {REBUILD}") from e
    return ext, build_info
