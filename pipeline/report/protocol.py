"""`results/protocol.json`: how the run's numbers were measured, so that they travel with it
(docs/evaluation.md, "The protocol"). Two runs' FIDs compare only when these agree;
`differences` names what does not (the notebook's comparisons print it).
"""
import json
import subprocess
from pathlib import Path

from pipeline.features.layers import CLASSIFIER, INCEPTION, INCEPTION_TF

# What each FID extractor is fed (docs/inception.md).
EXTRACTOR_INPUT = {
    CLASSIFIER: "the samples as drawn: [-1, 1], the data's own size; the features stage's classifier, penultimate layer",
    INCEPTION_TF: "resized to 299x299 (bilinear, TF1-compatible), [0, 255]; TF-Inception pool3, 2048 features",
    INCEPTION: "resized to 299x299 (bilinear, TF1-compatible), [0, 255]; torch-fidelity's Inception-v3, 2048 features",
}
CHECKPOINT_RULE = ("every model is its training stage's final weights (the EMA where the stage keeps one); no "
                   "checkpoint is chosen by an evaluation metric")
TEACHER_BEST_RULE = ("chosen on each half of the evaluated inputs (jackknife groups by parity) and compared on the "
                     "other half")
VERDICT_FAMILIES = {  # pipeline.report.family
    "summary": "simultaneous 95 % (max-|t| over the family: every point against its teacher's best, the targets)",
    "comparisons": "false discovery rate 5 % (Benjamini-Hochberg; false-coverage-rate intervals)",
}
# Fields that describe the code or the run's outcome, not how it was measured: they differ
# between comparable runs.
NOT_PROTOCOL = ("code_commit", "family_levels")


def code_commit(root="."):
    """The git commit of `root`, with `+changes` when the work tree differs from it; None outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_protocol(results, info, grid, training_seeds, levels, commit):
    """The protocol of a run's report: `results` (points.Results), `info` (the features stage's
    info.json), the sampling grid convention, the students' training seeds, the verdict
    families' sizes and levels in this run (`levels`: {list: {...}}) and the code commit."""
    p = results.protocol
    return {
        "extractor": {"name": info["extractor"], "fid_name": info["fid_name"],
                      "input": EXTRACTOR_INPUT.get(info["extractor"], "unknown")},
        "evaluated_inputs": {"split": "test", "n": p["n"], "jackknife_groups": p["groups"]},
        "reference": {"split": "reference", "n": info["n_reference"]},
        "sampling_seeds": list(p.get("seeds", [])),
        "training_seeds": list(training_seeds),
        "grid": grid,
        "checkpoint_rule": CHECKPOINT_RULE,
        "teacher_best": TEACHER_BEST_RULE,
        "verdict_families": VERDICT_FAMILIES,
        "family_levels": levels,
        "code_commit": commit,
    }


def read(path):
    """A run's protocol.json (a results folder or the file)."""
    path = Path(path)
    return json.loads((path / "protocol.json" if path.is_dir() else path).read_text())


def differences(a, b, ignore=NOT_PROTOCOL):
    """{field: (a's, b's)} for every measurement field in which two protocols differ."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}
