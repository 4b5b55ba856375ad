"""Models of the built-in training driver: a registry of builders.

Layers are addressed by name in the store (``activations/fc1``, per-layer gradient norms), so
every model uses named children (``conv1``, ``fc1``, ...) and a separate module instance for
each activation, so that a forward hook on ``relu1`` sees exactly one tensor per forward.

Add a model with::

    @register_model("name")
    def _build(num_classes, input_shape, **options) -> nn.Module: ...
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

__all__ = ["MODELS", "SmallCNN", "MLPBatchNorm", "build_model", "count_parameters",
           "register_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register a builder ``f(num_classes, input_shape, **options) -> nn.Module``."""

    def decorate(builder):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return decorate


def build_model(name: str, num_classes: int, input_shape: Sequence[int], **options) -> nn.Module:
    """Build model `name` for inputs of shape (C, H, W) and `num_classes` outputs."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") \
            from None
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return builder(num_classes, shape, **options)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class SmallCNN(nn.Module):
    """conv(C->32)-ReLU-pool - conv(32->64)-ReLU-pool - fc(->128)-ReLU - fc(->classes).

    The small CNN of the earlier tools: 545,098 parameters on 3x32x32 inputs with 10 classes.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 channels: tuple[int, int] = (32, 64), hidden: int = 128):
        super().__init__()
        c, h, w = input_shape
        c1, c2 = channels
        self.conv1 = nn.Conv2d(c, c1, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * (h // 2 // 2) * (w // 2 // 2), hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(x)


class MLPBatchNorm(nn.Module):
    """Flatten, then hidden blocks Linear-BatchNorm1d-ReLU (``fc{i}``, ``bn{i}``, ``relu{i}``)
    and a final Linear; the MNIST MLP of the earlier feature-signal tool.

    BatchNorm couples the examples of a batch in training mode, so its per-example gradients
    are those of the batch statistics as computed, not of an isolated example.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 hidden: Sequence[int] = (512, 256, 128)):
        super().__init__()
        self.flatten = nn.Flatten()
        width = input_shape[0] * input_shape[1] * input_shape[2]
        for i, units in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(width, units))
            self.add_module(f"bn{i}", nn.BatchNorm1d(units))
            self.add_module(f"relu{i}", nn.ReLU())
            width = units
        self.num_hidden = len(hidden)
        self.add_module(f"fc{len(hidden) + 1}", nn.Linear(width, num_classes))

    def forward(self, x):
        x = self.flatten(x)
        for i in range(1, self.num_hidden + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"fc{i}")(x)))
        return getattr(self, f"fc{self.num_hidden + 1}")(x)


@register_model("cnn")
def _cnn(num_classes, input_shape, **options) -> nn.Module:
    return SmallCNN(num_classes, input_shape, **options)


@register_model("mlp-bn")
def _mlp_bn(num_classes, input_shape, **options) -> nn.Module:
    return MLPBatchNorm(num_classes, input_shape, **options)


@register_model("resnet18")
def _resnet18(num_classes, input_shape) -> nn.Module:
    """torchvision ResNet-18 for small images: 3x3 stride-1 stem, no max-pool (the usual CIFAR
    adaptation, else a 32x32 input is 1x1 by layer4), stem channels = input channels.
    Untrained (weights=None): nothing is downloaded."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
