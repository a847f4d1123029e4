"""Residual bottleneck adapters (Rebuffi et al. 2017; Houlsby et al. 2019) and the model surgery
around them: insert adapters into a backbone, freeze it (BatchNorm statistics included), count and
group its parameters, and save / load only the trained part with a fingerprint of the backbone.

The adapter math lives in fastcascade.reference (pooled_adapter, pixel_adapter). ResidualAdapter
runs the fused ops fastcascade::pooled_adapter and fastcascade::pixel_adapter (CPU and CUDA C++,
Triton), dropout included (its mask drawn in the kernels from a seed).

Name matching. freeze_backbone and param_groups select parameters by *components* of their
qualified names: an entry matches when it equals one or more whole dot-separated components, so
"fc" matches "fc.weight" and "head.fc.bias" but not ConvNeXt's "stages.0.blocks.1.mlp.fc1.weight",
and "head" does not match EfficientNet's "conv_head.weight" (both belong to the backbone).
"""

from . import module, state, surgery
from .module import *  # noqa: F403
from .state import *  # noqa: F403
from .state import FORMAT, META_KEY  # noqa: F401  (the adapter_state_dict format)
from .surgery import *  # noqa: F403
from .surgery import DEFAULT_LR, DEFAULT_TRAINABLE  # noqa: F401  (the defaults of param_groups, freeze_backbone)

__all__ = module.__all__ + surgery.__all__ + state.__all__
