"""fastcascade: fused focal losses, adapter bottlenecks and early-exit cascade routing for PyTorch.

The public API is the union of the submodules' ``__all__`` (each name is defined, documented and listed
in one module): losses, routing, metrics, calibration, segmentation, adapters, cascade, inference, train,
and selftest (the function).
"""

from . import (  # noqa: F401
           _ops,  # noqa: F401  (loads _C, registers fake kernels and autograd)
           adapters,
           calibration,
           cascade,
           data,  # noqa: F401  (fastcascade.data; scikit-image is imported only to build the dataset)
           inference,
           losses,
           metrics,
           reference,
           routing,
           segmentation,
           train,
)
from .adapters import *  # noqa: F403
from .calibration import *  # noqa: F403
from .cascade import *  # noqa: F403
from .data import AV1_TTA_LABEL_MAPS  # the domain's TTA maps, exported here since tta_predict's first release
from .inference import *  # noqa: F403
from .losses import *  # noqa: F403
from .metrics import *  # noqa: F403
from .routing import *  # noqa: F403
from .segmentation import *  # noqa: F403
from .selftest import selftest  # the function; the package stays reachable as fastcascade.selftest.<module>
from .train import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [name for module in (losses, routing, metrics, calibration, segmentation, adapters, cascade, inference,
                               train) for name in module.__all__] + ["AV1_TTA_LABEL_MAPS", "selftest"]
