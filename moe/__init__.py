"""Mixture-of-Experts models in pure torch: the MoE layer, a decoder LM and a classifier.

    from moe import MoE, MoELM, MoEClassifier, LMConfig, preset
"""

from moe.boundary import ExpertGroup, LocalExperts, OptimizerSettings
from moe.config import PRESETS, LMConfig, MoEConfig, preset
from moe.experts import SwiGLU, expert_uid, parse_expert_uid
from moe.layer import MoE

__all__ = ["MoE", "MoELM", "MoEClassifier", "LMConfig", "MoEConfig", "PRESETS", "preset", "SwiGLU",
           "ExpertGroup", "LocalExperts", "OptimizerSettings", "expert_uid", "parse_expert_uid"]


def __getattr__(name):
    # The LM and classifier import lazily so `import moe` stays cheap for services that need only the layer.
    if name == "MoELM":
        from moe.lm import MoELM
        return MoELM
    if name == "MoEClassifier":
        from moe.classifier import MoEClassifier
        return MoEClassifier
    raise AttributeError(f"module 'moe' has no attribute {name!r}")
