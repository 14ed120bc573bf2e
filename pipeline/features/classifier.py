"""A small CNN classifier whose penultimate layer is the feature space of FID.

The Inception network behind the usual FID (Heusel et al. 2017) cannot be
downloaded on these machines, so the `features` stage trains this classifier
on the clean training split and FID/KID are computed on its penultimate
activations instead ("classifier FID", the same idea as the LeNet-feature FID
used for MNIST-scale GANs). Adaptive pooling lets one architecture serve every
image size from 8x8 (scikit-learn digits) up to 32x32 (CIFAR).

Checkpoints carry their params and shapes, so `load_classifier` needs nothing
but the path.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.settings import ClassifierParams, TrainParams
from pipeline.errors import PipelineError
from pipeline.runtime.outputs import save_atomic
from pipeline.training.loop import LoopHooks, Task, run_training

CHECKPOINT_FORMAT = "pipeline.classifier/v1"  # as first written: every checkpoint carries it
_CHECKPOINT_KEYS = ("format", "state_dict", "params", "in_channels", "num_classes")


def _groups(channels):
    # GroupNorm needs channels divisible by the group count.
    return math.gcd(8, channels)


def _conv_block(c_in, c_out):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.SiLU(),
    )


class Classifier(nn.Module):
    """Conv blocks (2x average-pool between levels) -> adaptive pool -> feature MLP -> logits.

    Works for any image side >= 8: with up to four levels an 8x8 image is
    pooled at most three times (to 1x1) before the adaptive pool.
    """

    def __init__(self, params, in_channels, num_classes):
        super().__init__()
        self.params, self.in_channels, self.num_classes = params, in_channels, num_classes
        levels, c_prev = [], in_channels
        for i, c in enumerate(params.channels):
            pool = [nn.AvgPool2d(2)] if i > 0 else []
            levels += pool + [_conv_block(c_prev, c)]
            c_prev = c
        self.trunk = nn.Sequential(*levels)
        self.pool = nn.AdaptiveAvgPool2d(params.pool_size)
        self.embed = nn.Linear(c_prev * params.pool_size**2, params.feature_dim)
        self.head = nn.Linear(params.feature_dim, num_classes)

    def features(self, x):  # (N, C, H, W) in [-1, 1] -> (N, feature_dim)
        h = self.pool(self.trunk(x)).flatten(1)
        return F.silu(self.embed(h))

    def forward(self, x):  # (N, C, H, W) -> (N, num_classes)
        return self.head(self.features(x))


def classifier_features(model, x):
    """The FID features of uint8 images (N, C, H, W) in 0..255: the classifier's penultimate
    layer on x / 127.5 - 1, the range it was trained on. The one definition that both the
    direct path (`fid.extract_features`) and torch-fidelity's extractor use."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected a uint8 (N, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    return model.features(x.float() / 127.5 - 1.0)


def classification_loss(model, x, label):
    """Mean cross-entropy of the logits against integer labels (N,)."""
    return F.cross_entropy(model(x), label)


@torch.no_grad()
def accuracy(model, x, label, batch_size=512):
    """Fraction of correct top-1 predictions, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct += (logits.argmax(dim=1) == label[start : start + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(x), 1)


class ClassifierTask(Task):
    """Cross-entropy on the clean images: the `features` stage trains this under Ray Train."""

    def __init__(self, params: ClassifierParams, in_channels, num_classes):
        self.params, self.in_channels, self.num_classes = params, in_channels, num_classes

    def build(self):
        return {"classifier": Classifier(self.params, self.in_channels, self.num_classes)}

    def loss(self, nets, batch, generator):
        logits = nets["classifier"](batch["x0"])
        return F.cross_entropy(logits, batch["label"], reduction="none")  # (B,)


def train_classifier(x, label, params: ClassifierParams, train: TrainParams, seed=0, num_classes=None):
    """Train in-process with the shared loop (no Ray); returns (model in eval mode, history)."""
    num_classes = num_classes or int(label.max()) + 1
    task = ClassifierTask(params, x.shape[1], num_classes)
    hooks = LoopHooks()
    state = run_training(task, {"x0": x, "label": label}, train, seed, hooks)
    model = task.build()["classifier"]
    model.load_state_dict(state["ema"]["classifier"])
    return model.eval(), hooks.history


def save_classifier(path, model, params, in_channels, num_classes):
    """Write a self-describing checkpoint atomically (temp file, then os.replace)."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": model.state_dict(),
        "params": params.model_dump(mode="json"),
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
    }
    save_atomic(checkpoint, path)


class ClassifierError(PipelineError, ValueError):
    """The classifier checkpoint is missing or is not one."""


def _read_checkpoint(path):
    if not Path(path).is_file():
        raise ClassifierError(f"{path} is missing: the features stage writes it (dvc repro features)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClassifierError(f"{path}: not a classifier checkpoint (torch.load failed: {e})") from e
    if not isinstance(checkpoint, dict):
        raise ClassifierError(f"{path}: not a classifier checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ClassifierError(f"{path}: not a classifier checkpoint (missing keys: {', '.join(missing)})")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise ClassifierError(f"{path}: format {checkpoint['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    return checkpoint


def load_classifier(path):
    """Rebuild the classifier of a `save_classifier` checkpoint, in eval mode on the CPU.

    Its params and shapes are on the module: `.params`, `.in_channels`,
    `.num_classes`. Raises ValueError naming the path when the file is not such
    a checkpoint.
    """
    checkpoint = _read_checkpoint(path)
    try:
        params = ClassifierParams.model_validate(checkpoint["params"])
        model = Classifier(params, checkpoint["in_channels"], checkpoint["num_classes"])
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as e:
        raise ClassifierError(f"{path}: classifier checkpoint does not rebuild ({e})") from e
    return model.eval()
