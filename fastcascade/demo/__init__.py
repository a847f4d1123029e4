"""The main job, ``python -m fastcascade demo``: the AV1 partition cascade trained and evaluated on the
embedded dataset (models, the training recipe, its plots)."""

from .recipe import run_demo

__all__ = ["run_demo"]
