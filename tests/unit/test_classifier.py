"""The FID feature classifier: it learns, it fits every image size, its checkpoints round-trip."""
import os

import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_digits

from pipeline.config.settings import ClassifierParams, TrainParams
from pipeline.features.classifier import (
    Classifier,
    accuracy,
    classification_loss,
    load_classifier,
    save_classifier,
    train_classifier,
)
from tests.conftest import one_torch_thread


def digits():
    """scikit-learn's 8x8 digits in [-1, 1], shuffled with a fixed seed: (1797, 1, 8, 8), (1797,)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixel values 0..16
    label = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], label[perm]


# One torch thread in every test of this module (tests/conftest.py).
one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def test_reaches_90_percent_on_held_out_digits():
    x, label = digits()
    train = TrainParams(steps=250, batch_size=64, lr=3e-3, warmup_steps=0, ema_decay=0.0, log_every=25)
    model, history = train_classifier(x[:1300], label[:1300], ClassifierParams(), train, seed=1,
                                      num_classes=10)
    assert len(history) == train.steps // train.log_every
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert accuracy(model, x[1300:], label[1300:], batch_size=100) > 0.9


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_any_size_from_8_gives_features_and_logits(shape):
    params = ClassifierParams(feature_dim=16)
    model = Classifier(params, in_channels=shape[0], num_classes=10)
    x = torch.rand(5, *shape) * 2 - 1
    assert model.features(x).shape == (5, 16)
    assert model(x).shape == (5, 10)


@pytest.mark.parametrize("channels", [(8,), (8, 16, 16, 16)])
def test_one_to_four_levels_fit_8x8(channels):
    model = Classifier(ClassifierParams(channels=channels), in_channels=1, num_classes=3)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_loss_is_a_scalar_with_gradients():
    model = Classifier(ClassifierParams(), in_channels=1, num_classes=10)
    loss = classification_loss(model, torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.trunk[0][0].weight.grad is not None


def test_accuracy_restores_training_mode():
    model = Classifier(ClassifierParams(), in_channels=1, num_classes=10).train()
    acc = accuracy(model, torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    assert 0.0 <= acc <= 1.0 and model.training


def test_params_are_validated():
    with pytest.raises(ValidationError):
        ClassifierParams(channels=())
    with pytest.raises(ValidationError):
        ClassifierParams(feature_dim=0)
    with pytest.raises(ValidationError):
        ClassifierParams(widht=3)


def test_checkpoint_round_trips(tmp_path):
    params = ClassifierParams(channels=(8, 16), feature_dim=12)
    torch.manual_seed(0)
    model = Classifier(params, in_channels=3, num_classes=7).eval()
    path = tmp_path / "sub" / "classifier.pt"
    save_classifier(path, model, params, in_channels=3, num_classes=7)
    assert os.listdir(path.parent) == ["classifier.pt"]  # no temp file left behind

    loaded = load_classifier(path)
    assert (loaded.params, loaded.in_channels, loaded.num_classes) == (params, 3, 7)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_overwrite_is_replaced(tmp_path):
    params = ClassifierParams(channels=(8,), feature_dim=8)
    path = tmp_path / "classifier.pt"
    save_classifier(path, Classifier(params, 1, 2), params, 1, 2)
    save_classifier(path, Classifier(params, 1, 5), params, 1, 5)
    assert load_classifier(path).num_classes == 5


def test_garbage_file_raises_naming_the_path(tmp_path):
    path = tmp_path / "not_a_checkpoint.pt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not_a_checkpoint.pt"):
        load_classifier(path)


def test_foreign_checkpoint_names_path_and_missing_keys(tmp_path):
    path = tmp_path / "state_dict_only.pt"
    torch.save(Classifier(ClassifierParams(), 1, 10).state_dict(), path)
    with pytest.raises(ValueError, match=r"state_dict_only\.pt.*missing keys: format, state_dict, params"):
        load_classifier(path)


def test_inconsistent_checkpoint_raises_naming_the_path(tmp_path):
    params = ClassifierParams(channels=(8,), feature_dim=8)
    path = tmp_path / "inconsistent.pt"
    # Shape info that does not match the stored weights.
    save_classifier(path, Classifier(params, 1, 10), params, in_channels=3, num_classes=10)
    with pytest.raises(ValueError, match="inconsistent.pt"):
        load_classifier(path)
