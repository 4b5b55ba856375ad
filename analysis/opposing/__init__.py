"""Opposing signals (issue 4): example pairs and groups that pull training apart.

Pure functions of a recorded run and their parameters; each reads the stored gradient
projections and losses, so rerunning with other thresholds never retrains. See
docs/OPPOSING.md.
"""
from .topk import PairSet, most_negative_pairs, within_batch_pairs
from .pairs import opposing_pairs
from .majority import loo_cosine, majority_opposition
from .groups import extreme_movers, opposing_groups, robust_z
from .distribution import cosine_histogram, loss_change_outliers

__all__ = ["PairSet", "most_negative_pairs", "within_batch_pairs", "opposing_pairs",
           "loo_cosine", "majority_opposition", "extreme_movers", "opposing_groups", "robust_z",
           "cosine_histogram", "loss_change_outliers"]
