"""The built-in training driver behind `dynascope record` and `dynascope demo`: datasets
(torchvision and the offline `planted` generator), models, the training loop and its
checkpoints. It uses the recording library (`dynascope.recorder`) like any user loop would;
the library never imports it."""
from .loop import EpochOrder, TrainConfig, make_optimizer, make_schedule, record_run, resolve_device

__all__ = ["EpochOrder", "TrainConfig", "make_optimizer", "make_schedule", "record_run", "resolve_device"]
