"""The built-in models (recorder/driver/models.py) against torch.func per-example gradients."""
import pytest
import torch

from gradients_helpers import check, record
from dynascope.recorder.gradients import GradientExtension
from dynascope.recorder.driver.models import build_model

torch.set_num_threads(1)


@pytest.mark.parametrize("name,shape,B", [("cnn", (3, 8, 8), 5), ("mlp-bn", (1, 6, 6), 5),
                                          ("resnet18", (3, 8, 8), 3)])
def test_builtin_model_eval_mode_matches_vmap(name, shape, B):
    torch.manual_seed(0)
    model = build_model(name, 10, shape)
    if name != "cnn":  # BN: vmap needs batch-independent statistics
        with torch.no_grad():
            model.train()(torch.randn(8, *shape))
        model.eval()
    x, y = torch.randn(B, *shape), torch.randint(0, 10, (B,))
    ext, cols = check(model, x, y, projection_dim=1024)
    meta = ext.metadata()
    assert meta["excluded_parameters"] == {}
    assert meta["covered_fraction"] == 1.0
    assert cols["grad_proj"].shape == (B, meta["projection"]["dim"])
    assert meta["projection"]["dim"] == 1024  # one shared sketch, no per-layer split


def test_cnn_default_layout():
    model = build_model("cnn", 10, (3, 32, 32))
    meta = GradientExtension(projection_dim=True).attach_model(model).metadata()
    assert meta["layer_names"] == ["conv1", "conv2", "fc1", "fc2"]
    assert meta["projection"]["dim"] == 1024 and meta["projection"]["kind"] == "count_sketch"
    assert [l["sketch"] for l in meta["layers"]] == ["tensorsketch"] * 4
    assert meta["batchnorm_train_mode_coupling"] is False


def test_resnet18_train_mode_runs_and_is_flagged():
    torch.manual_seed(1)
    model = build_model("resnet18", 10, (3, 8, 8)).train()
    ext = GradientExtension(projection_dim=256).attach_model(model)
    cols = record(model, ext, torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    assert torch.isfinite(cols["grad_proj"]).all() and (cols["grad_norm"] > 0).all()
    assert ext.metadata()["batchnorm_train_mode_coupling"] is True
