"""Attribution methods registered by name, all ``fn(model, inputs, targets, context, **params)``.

Importing this package registers every built-in method.
"""

# Imported to register the methods, in the order `available_methods()` lists them.
from saliencycheck.methods import gradient  # noqa: F401, I001
from saliencycheck.methods import integrated_gradients  # noqa: F401
from saliencycheck.methods import modified_relu  # noqa: F401
from saliencycheck.methods import gradcam  # noqa: F401
from saliencycheck.methods import lrp  # noqa: F401
from saliencycheck.methods import deeplift  # noqa: F401
from saliencycheck.methods import occlusion  # noqa: F401
from saliencycheck.methods import rollout  # noqa: F401
from saliencycheck.methods import noise_tunnel  # noqa: F401
from saliencycheck.methods import custom  # noqa: F401
from saliencycheck.methods.base import AttributionContext, AttributionFn
from saliencycheck.engine.passes import ReluRuleWarning, compute_maps
from saliencycheck.methods.registry import (
    MethodParams,
    MethodSpec,
    ResolvedMethod,
    available_methods,
    get_method,
    register_method,
    resolve_method,
)

__all__ = [
    "AttributionContext",
    "AttributionFn",
    "MethodParams",
    "MethodSpec",
    "ReluRuleWarning",
    "ResolvedMethod",
    "available_methods",
    "compute_maps",
    "get_method",
    "register_method",
    "resolve_method",
]
