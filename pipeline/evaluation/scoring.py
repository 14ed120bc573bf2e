"""Scoring samples: every metric of an evaluated point with its 95 % interval, the one place
samples become metrics (the evaluate stage, the floor stage and sweep trials call it).

A point is one (model, sampler, NFE) sampled once per sampling seed for the same evaluated
inputs. Per seed: FID and KID of the samples' features against the reference split's
(FID the Frechet distance of their Gaussians, equal to torch-fidelity's to 1e-9 relative,
tests/unit/test_uncertainty.py; KID the full-set unbiased MMD^2; improved precision and
recall, k = 3, in the same feature space), FID also on each half of the inputs (the teacher's
best is chosen on one, compared on the other: pipeline.evaluation.selection), and for a
conditional task PSNR/SSIM against each input's truth and the classifier's accuracy on
the input's label. The estimate is the mean over seeds; its interval comes from the
leave-a-group-out replicates of that mean (pipeline.evaluation.uncertainty, docs/evaluation.md).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.metrics import psnr, ssim
from pipeline.evaluation.results import SCORED, FeatureSpace
from pipeline.evaluation.selection import half_groups
from pipeline.evaluation.uncertainty import (Manifold, Point, Reference, frechet_distance, groups_of, kid,
                                             mean_with_replicates, precision_recall, reference_kernel_mean)
from pipeline.features.classifier import load_classifier
from pipeline.features.fid import cached_reference_features, extract_features
from pipeline.features.layers import CLASSIFIER



class Scorer:
    """Built once per stage: the feature extractor's reference, the classifier, the groups of
    the `n` evaluated inputs."""

    def __init__(self, features: FeatureSpace, n, groups, image_shape, device="cpu"):
        self.features, self.group, self.device = features, groups_of(n, groups), device
        self.halves = half_groups(self.group) if groups >= 4 else None  # each half jackknifed: 2+ groups
        self.ref_features = cached_reference_features(
            cache_root=str(features.root / "fid_cache"), reference_cache_name=features.reference,
            image_shape=tuple(image_shape), extractor=features.extractor, weights_path=features.weights)
        self.reference = Reference.of(self.ref_features)
        self.ref_kernel_mean = reference_kernel_mean(self.ref_features)  # KID's reference term, once
        self.manifold = Manifold.of(self.ref_features)  # precision's reference balls, once
        self.classifier = load_classifier(features.root / "classifier.pt")
        # The classifier extractor's weights are this classifier: loaded once, not per scored set.
        same = features.extractor == CLASSIFIER and Path(features.weights) == features.root / "classifier.pt"
        self._extractor_model = self.classifier if same else None

    def score(self, samples, truth) -> "Scored":
        """`Scored`: {metric: Point} for `samples`, a list over seeds of (n, C, H, W) in [-1, 1] for the
        inputs of `truth` (a Split of the same n); NaN points for an unconditional task's
        PSNR/SSIM/accuracy, and for a class-conditional one's PSNR/SSIM (no paired truth).
        `halves`: {"fid": (Point, Point)}, FID on each half of the inputs (pipeline.evaluation.selection)."""
        per_seed = {m: [] for m in ("fid", "kid", "precision", "recall", "fid_half0", "fid_half1")}
        per_image = {m: [] for m in ("psnr", "ssim", "accuracy")}
        for x in samples:
            f = extract_features(x, extractor=self.features.extractor, weights_path=self.features.weights,
                                 device=self.device, classifier=self._extractor_model)
            per_seed["fid"].append(frechet_distance(f, self.reference, self.group))
            per_seed["kid"].append(kid(f, self.ref_features, self.group, k_yy=self.ref_kernel_mean))
            precision, recall = precision_recall(f, self.manifold, self.group)
            per_seed["precision"].append(precision)
            per_seed["recall"].append(recall)
            for h, (mask, group) in enumerate(self.halves or ()):
                per_seed[f"fid_half{h}"].append(frechet_distance(f[mask], self.reference, group))
            if truth.conditional:
                per_image["psnr"].append(psnr(x, truth.x0).double().numpy())
                per_image["ssim"].append(ssim(x, truth.x0).double().numpy())
            if truth.conditional or truth.class_conditional:  # against the input's / requested label
                per_image["accuracy"].append(self._correct(x, truth.label))
        points = {m: Point(float(np.mean([e for e, _ in v])), tuple(np.mean([r for _, r in v], axis=0)))
                  for m, v in per_seed.items() if v}
        halves = {"fid": (points.pop("fid_half0"), points.pop("fid_half1"))} if self.halves else {}
        for m, v in per_image.items():
            points[m] = Point(*mean_with_replicates(np.stack(v), self.group)) if v else NAN_POINT
        return Scored(points, halves)

    @torch.no_grad()
    def _correct(self, x, label, batch=512):
        self.classifier.eval()
        hits = [(self.classifier(x[i:i + batch]).argmax(1) == label[i:i + batch]) for i in range(0, len(x), batch)]
        return torch.cat(hits).double().numpy()


NAN_POINT = Point(float("nan"), ())


@dataclass(frozen=True)
class Scored:
    """One point's metrics: {metric: Point} for every SCORED metric, and `halves`, the metrics
    (FID) also scored on each half of the inputs for choosing the teacher's best fairly."""
    points: dict
    halves: dict

    def replicates(self):
        """The replicates.json form: {metric: replicates, "halves": {metric: [{estimate, replicates}] * 2}}."""
        out = {m: list(p.replicates) for m, p in self.points.items()}
        if self.halves:
            out["halves"] = {m: [{"estimate": p.estimate, "replicates": list(p.replicates)} for p in pair]
                             for m, pair in self.halves.items()}
        return out


def row_metrics(points, level=0.95):
    """{m, m_lo, m_hi} for each scored metric: the flat columns of metrics.csv and MLflow."""
    out = {}
    for m in SCORED:
        p = points[m]
        lo, hi, _ = p.interval(level) if p.replicates else (float("nan"),) * 3
        out.update({m: p.estimate, f"{m}_lo": lo, f"{m}_hi": hi})
    return out
