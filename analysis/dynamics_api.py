"""Public names of the example-dynamics analyses (issue 5), re-exported by `analysis`."""
from .difficulty import aum, cartography, difficulty, el2n, grand
from .forgetting import forgetting, forgetting_timeline
from .loss_changes import example_loss_change
from .scoring import auroc, mislabel_detection

__all__ = ["forgetting", "forgetting_timeline", "cartography", "aum", "el2n", "grand",
           "difficulty", "example_loss_change", "auroc", "mislabel_detection"]
