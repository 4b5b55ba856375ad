"""Models of the built-in driver: output shapes, parameter counts against independent formulas,
and the layer names the store addresses."""

import pytest
import torch
from torch import nn

from dynascope.recorder.driver.models import MODELS, build_model, count_parameters, register_model

torch.set_num_threads(1)


def conv_params(c_in, c_out, k=3, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear_params(n_in, n_out):
    return n_in * n_out + n_out


def bn_params(n):
    return 2 * n


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_cnn_shapes_and_parameter_count(shape):
    c, h, w = shape
    model = build_model("cnn", 10, shape)
    expected = (conv_params(c, 32) + conv_params(32, 64)
                + linear_params(64 * (h // 4) * (w // 4), 128) + linear_params(128, 10))
    assert count_parameters(model) == expected
    assert model(torch.randn(4, *shape)).shape == (4, 10)


def test_cnn_cifar_is_the_545k_model():
    assert count_parameters(build_model("cnn", 10, (3, 32, 32))) == 545_098


def test_cnn_layer_names():
    names = dict(build_model("cnn", 10, (3, 32, 32)).named_children())
    assert list(names) == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten",
                           "fc1", "relu3", "fc2"]
    assert isinstance(names["conv1"], nn.Conv2d) and isinstance(names["fc2"], nn.Linear)


def test_cnn_each_activation_hook_fires_once():
    model = build_model("cnn", 10, (3, 32, 32))
    calls = []
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    model(torch.randn(2, 3, 32, 32))
    assert sorted(calls) == sorted(dict(model.named_children()))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_mlp_bn_shapes_and_parameter_count(shape):
    n_in = shape[0] * shape[1] * shape[2]
    model = build_model("mlp-bn", 10, shape)
    expected = (linear_params(n_in, 512) + bn_params(512) + linear_params(512, 256)
                + bn_params(256) + linear_params(256, 128) + bn_params(128)
                + linear_params(128, 10))
    assert count_parameters(model) == expected
    assert model(torch.randn(5, *shape)).shape == (5, 10)
    names = dict(model.named_children())
    assert {"fc1", "bn1", "relu1", "fc2", "bn2", "fc3", "bn3", "fc4"} <= set(names)
    assert isinstance(names["bn2"], nn.BatchNorm1d)


def test_mlp_bn_hidden_option():
    model = build_model("mlp-bn", 3, (1, 4, 4), hidden=(8,))
    assert count_parameters(model) == linear_params(16, 8) + bn_params(8) + linear_params(8, 3)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_resnet18_small_image_adaptation(shape):
    from torchvision.models import resnet18

    model = build_model("resnet18", 10, shape)
    assert model.conv1.in_channels == shape[0]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    stock = count_parameters(resnet18(weights=None, num_classes=10))
    stem_change = conv_params(shape[0], 64, 3, bias=False) - conv_params(3, 64, 7, bias=False)
    assert count_parameters(model) == stock + stem_change
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_num_classes_respected():
    for name in ("cnn", "mlp-bn"):
        assert build_model(name, 3, (3, 32, 32))(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_registry_errors():
    assert {"cnn", "mlp-bn", "resnet18"} <= set(MODELS)
    with pytest.raises(ValueError, match="available: .*cnn"):
        build_model("vgg", 10, (3, 32, 32))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("cnn", 10, (32, 32))
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn")(lambda num_classes, input_shape: None)
