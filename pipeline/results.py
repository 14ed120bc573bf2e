"""Formats shared between stages: the metrics every evaluation writes and the report reads,
and what the features stage writes for evaluation to read (`FeatureSpace`). Torch-free."""
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

METRICS = ("fid", "kid", "psnr", "ssim", "accuracy", "sec_per_sample")
COLUMNS = ("model", "method", "teacher", "sampler", "nfe") + METRICS


class FeaturesError(PipelineError):
    """The features stage's output is missing or unreadable."""


@dataclass(frozen=True)
class FeatureSpace:
    """What the `features` stage wrote (its `info.json` says which): the FID extractor, the
    weights it reads, the name of the reference split's cached statistics, and the
    classifier that scores accuracy. `load` fails, naming the file and the stage."""
    root: Path
    extractor: str
    weights: str  # the extractor's weights file
    reference: str  # cache name of the reference statistics (under root/fid_cache)
    fid_name: str  # how tables name this FID ("classifier FID", "Inception FID")

    @classmethod
    def load(cls, root):
        root = Path(root)
        info = root / "info.json"
        if not info.is_file():
            raise FeaturesError(f"{info} is missing: the features stage writes it (dvc repro features)")
        try:
            meta = json.loads(info.read_text())
            weights = Path(meta["weights"])
            return cls(root, meta["extractor"], str(weights if weights.is_absolute() else root / weights),
                       meta["reference"], meta["fid_name"])
        except (ValueError, KeyError) as err:
            raise FeaturesError(f"{info} is unreadable ({type(err).__name__}: {err}); rerun the features "
                                "stage (dvc repro -f features)") from None

    def classifier(self):
        from pipeline.classifier import load_classifier  # torch: only where samples are scored
        return load_classifier(self.root / "classifier.pt")

    def fid_kwargs(self, kid_subset_size):
        return {"extractor": self.extractor, "weights_path": self.weights, "kid_subset_size": kid_subset_size,
                "cache_root": str(self.root / "fid_cache"), "reference_cache_name": self.reference}
