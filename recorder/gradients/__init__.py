"""Per-example gradient signals on the training hot path (issue 3): exact norms and
factored random projections from hooks, no per-example gradient tensors. See
docs/GRADIENTS.md."""
from .extension import GradientExtension
from .projection import gaussian_matrix, layer_seed, projection_matrices
from .rules import RULES, Rule, find_rule, register_rule

__all__ = ["GradientExtension", "gaussian_matrix", "layer_seed", "projection_matrices",
           "RULES", "Rule", "find_rule", "register_rule"]
