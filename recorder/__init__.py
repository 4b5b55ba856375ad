"""Recording side of dynascope (depends on torch): hooks a training loop and writes a
run store (docs/STORE.md). `analysis` and `figures` read it back without torch."""
from .extensions import ArraySpec, BatchContext, Extension, register_extension
from .indexed import IndexedDataset
from .recorder import Recorder, StepContext
from .store import StoreExistsError
from .params import ParamStatsExtension  # noqa: E402  optimization insight (issue 7)

__all__ = ["Recorder", "IndexedDataset", "StepContext", "StoreExistsError", "Extension", "ArraySpec",
           "BatchContext", "register_extension"]
