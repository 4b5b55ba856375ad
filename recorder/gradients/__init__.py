"""Per-example gradient signals on the training hot path: exact norms, the exact in-batch
Gram and a shared CountSketch / TensorSketch from hooks, no per-example gradient tensors.
See docs/GRADIENTS.md."""
from .extension import GradientExtension
from .projection import gaussian_matrix, hashes, layer_hashes, layer_seed, sketch_reference
from .rules import RULES, Rule, find_rule, register_rule

__all__ = ["GradientExtension", "gaussian_matrix", "hashes", "layer_hashes", "layer_seed",
           "sketch_reference", "RULES", "Rule", "find_rule", "register_rule"]
