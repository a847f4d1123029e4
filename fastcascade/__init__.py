"""fastcascade: fused focal losses, adapter bottlenecks and early-exit cascade routing for PyTorch."""

from . import _ops, reference  # noqa: F401  (loads _C, registers fake kernels and autograd)
from . import data  # noqa: F401  (fastcascade.data; scikit-image is imported only to build the dataset)
from .adapters import (
    AdaptedBlock,
    ParameterCount,
    ResidualAdapter,
    adapter_state_dict,
    add_adapters,
    default_adapter_sites,
    freeze_backbone,
    load_adapter_state_dict,
    param_groups,
    trainable_parameters,
)
from .calibration import TemperatureScaler, expected_calibration_error, fit_temperature, tune_threshold
from .cascade import Argmax, Cascade, CascadeOutput, Confident, Ensemble, Leaf, Stage, Threshold
from .losses import (
    ClassBalancedFocalLoss,
    FocalLoss,
    SoftmaxFocalLoss,
    class_balanced_weights,
    inverse_frequency_weights,
    sigmoid_focal_loss,
    softmax_focal_loss,
)
from .metrics import ClassificationReport, EvaluationReport, classification_report, confusion_matrix
from .losses import DiceFocalLoss, dice_focal_loss
from .routing import (
    Partition,
    gather_rows,
    partition,
    route_argmax,
    route_confident,
    route_threshold,
    scatter_rows,
    vote,
)
from .train import evaluate, fit, load_checkpoint, save_checkpoint
from .selftest import selftest
from .segmentation import (
    AV1_TTA_LABEL_MAPS,
    TTA_TRANSFORMS,
    class_weights_from_pixel_counts,
    kfold_splits,
    pixel_class_counts,
    segmentation_report,
    tta_inverse,
    tta_label_map,
    tta_predict,
    tta_transform,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptedBlock",
    "ParameterCount",
    "ResidualAdapter",
    "adapter_state_dict",
    "add_adapters",
    "default_adapter_sites",
    "freeze_backbone",
    "load_adapter_state_dict",
    "param_groups",
    "trainable_parameters",
    "ClassBalancedFocalLoss",
    "FocalLoss",
    "SoftmaxFocalLoss",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "Partition",
    "gather_rows",
    "partition",
    "route_argmax",
    "route_confident",
    "route_threshold",
    "scatter_rows",
    "vote",
    "Argmax",
    "Cascade",
    "CascadeOutput",
    "Confident",
    "Ensemble",
    "Leaf",
    "Stage",
    "Threshold",
    "ClassificationReport",
    "EvaluationReport",
    "classification_report",
    "confusion_matrix",
    "TemperatureScaler",
    "expected_calibration_error",
    "fit_temperature",
    "tune_threshold",
    "evaluate",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
    "selftest",
    "DiceFocalLoss",
    "dice_focal_loss",
    "AV1_TTA_LABEL_MAPS",
    "TTA_TRANSFORMS",
    "class_weights_from_pixel_counts",
    "kfold_splits",
    "pixel_class_counts",
    "segmentation_report",
    "tta_inverse",
    "tta_label_map",
    "tta_predict",
    "tta_transform",
]
