"""Triton kernels of fastcascade (registered as torch custom ops on import).

Importing this subpackage defines the ops
``torch.ops.fastcascade.sigmoid_focal_triton`` and
``torch.ops.fastcascade.softmax_focal_triton``, and the routing, adapter, Dice + focal and metrics
twins (``*_triton``: same schemas as the C++ ops). Every op launches through _common.launch.
"""

from .adapter import pooled_adapter_backward_triton, pooled_adapter_triton
from .dice_focal import dice_focal_backward_triton, dice_focal_triton
from .focal import sigmoid_focal_triton, softmax_focal_triton
from .metrics import confusion_matrix_triton
from .pixel_adapter import pixel_adapter_backward_triton, pixel_adapter_triton
from .routing import (
    gather_rows_triton,
    partition_triton,
    route_argmax_triton,
    route_confident_triton,
    route_threshold_triton,
    scatter_rows_triton,
    vote_triton,
)

__all__ = [
    "pooled_adapter_backward_triton",
    "pooled_adapter_triton",
    "dice_focal_backward_triton",
    "dice_focal_triton",
    "sigmoid_focal_triton",
    "softmax_focal_triton",
    "gather_rows_triton",
    "partition_triton",
    "route_argmax_triton",
    "route_confident_triton",
    "route_threshold_triton",
    "scatter_rows_triton",
    "vote_triton",
    "confusion_matrix_triton",
    "pixel_adapter_backward_triton",
    "pixel_adapter_triton",
]
