"""Formats shared between stages: what the features stage writes for evaluation to read
(`FeatureSpace`), and what every evaluation writes for the report to read (metrics.csv,
metrics.json, replicates.json, sample grids). Torch-free except for writing grids.

An evaluation folder (`results/eval/<model>/`, and `results/eval/floor/` for the oracle and
input rows) holds:
- metrics.csv: one row per point (COLUMNS): every scored metric with its 95 % interval
  (`fid`, `fid_lo`, `fid_hi`, ...) and the measured seconds per sample;
- metrics.json: the same as {sampler: {nfe_NNN: {...}}} (for `dvc metrics` / `dvc exp show`);
- replicates.json: per point and metric, the leave-a-group-out replicates of the estimate
  (pipeline.evaluation.uncertainty), with the inputs, groups and seeds they were computed on, so the
  report compares points pairwise; under `halves`, FID on each half of the inputs with its
  own replicates (the teacher's best is chosen on one half, compared on the other:
  pipeline.evaluation.selection);
- grids/nfe_NNN.png, grids/rows.json: samples of the first sampling seed.
"""
import csv
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.runtime.outputs import staging_dir, write_json

SCORED = ("fid", "kid", "precision", "recall", "psnr", "ssim", "accuracy")  # each with _lo and _hi
LOWER_IS_BETTER = {"fid": True, "kid": True, "precision": False, "recall": False, "psnr": False, "ssim": False,
                   "accuracy": False}
METRICS = tuple(f"{m}{suffix}" for m in SCORED for suffix in ("", "_lo", "_hi")) + ("sec_per_sample",)
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


def point_key(sampler, nfe):
    return f"{sampler}@{nfe}"


def write_evaluation(out, rows, replicates, grids, protocol):
    """Write an evaluation folder (module docstring), built in a staging folder and swapped in
    whole. `replicates`: {point_key: {metric: [G floats]}}; `grids`: {file name: (row names,
    [tensors (n, C, H, W) in [-1, 1]])}; `protocol`: {n, groups, seeds, ...}."""
    with staging_dir(Path(out)) as tmp:
        nested = {}
        for r in rows:
            nested.setdefault(r["sampler"], {})[f"nfe_{r['nfe']:03d}"] = {m: r[m] for m in METRICS}
        write_json(tmp / "metrics.json", nested)
        with open(tmp / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        write_json(tmp / "replicates.json", {**protocol, "points": replicates})
        if grids:
            from torchvision.utils import save_image
            import torch
            (tmp / "grids").mkdir()
            for name, (_, images) in grids.items():
                n = min(len(r) for r in images)
                save_image((torch.cat([r[:n] for r in images]) + 1) / 2, str(tmp / "grids" / name), nrow=n,
                           padding=1, pad_value=1.0)
            write_json(tmp / "grids" / "rows.json", {name: rows_ for name, (rows_, _) in grids.items()})


def _read(folder):
    path = Path(folder) / "replicates.json"
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run `dvc repro` for the stage that writes {Path(folder).name}")
    return json.loads(path.read_text())


def read_replicates(folder):
    """(protocol, {point_key: {metric: tuple}}) of an evaluation folder; PipelineError if absent."""
    data = _read(folder)
    points = data.pop("points")
    return data, {k: {m: tuple(v) for m, v in metrics.items() if m != "halves"} for k, metrics in points.items()}


def read_halves(folder):
    """{point_key: {metric: [{estimate, replicates}] * 2}}: the points scored on each half of the
    inputs (none for the floor, whose inputs are no choice)."""
    return {k: metrics["halves"] for k, metrics in _read(folder)["points"].items() if "halves" in metrics}
