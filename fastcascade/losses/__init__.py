"""Fused focal losses: functions mirroring torch.nn.functional, and nn.Module wrappers.

One module per loss family: focal (sigmoid and softmax focal, with their modules), dice_focal (Dice +
softmax focal for segmentation) and class_weights (per-class weights from counts). Every function checks
its arguments before any kernel runs, then calls one fused op that reads the inputs once and, when a
gradient is needed, writes d loss / d logits in the same pass. How each loss compares with torchvision's
and MONAI's: docs/comparisons.md.
"""

from .class_weights import class_balanced_weights, inverse_frequency_weights
from .dice_focal import DiceFocalLoss, dice_focal_loss
from .focal import ClassBalancedFocalLoss, FocalLoss, SoftmaxFocalLoss, sigmoid_focal_loss, softmax_focal_loss

__all__ = [
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "FocalLoss",
    "SoftmaxFocalLoss",
    "ClassBalancedFocalLoss",
    "dice_focal_loss",
    "DiceFocalLoss",
]
