"""notebooks/compare.ipynb: committed without outputs, and executed headless top to bottom
against a small fake results tree (no MLflow runs, one sweep) and, slow, against the
smoke project after `dvc repro`."""
import json
import re
import sqlite3

import nbformat
import pandas as pd
import pytest
import torch
from nbconvert.preprocessors import ExecutePreprocessor
from torchvision.utils import save_image

from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "compare.ipynb"
SWEEP_COMMAND = "dvc exp run -S distill.ibmd.train.lr=0.001 -S distill.ibmd.aux_updates=5"


def execute(path, cwd):
    """Run every cell (a cell error raises) with the kernel's cwd at `cwd`."""
    nb = nbformat.read(path, as_version=4)
    ExecutePreprocessor(timeout=600, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(cwd)}})
    return nb


def sections(nb):
    """{heading: (printed text, number of images)}, outputs filed under the last `## ` heading."""
    found, heading = {}, "preamble"
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            heading = cell.source.splitlines()[0][3:]
        for out in cell.get("outputs", []):
            text, images = found.get(heading, ("", 0))
            text += out.get("text", "") if out.output_type == "stream" else ""
            found[heading] = (text, images + ("image/png" in out.get("data", {})))
    return found


def section(found, prefix):
    return next(value for heading, value in found.items() if heading.startswith(prefix))


def pareto_models(text):
    """Model names of the rows printed under 'Pareto front over NFE'."""
    lines = text.split("Pareto front over NFE")[1].splitlines()[2:]  # past the title and header
    return [line.split()[0] for line in lines if line.strip()]


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata
    assert all("widgets" not in c.metadata and "execution" not in c.metadata for c in nb.cells)


# The fake project: teachers `diffusion` (ddim, euler) and `bridge` (posterior), students
# `mm` (from diffusion, 2 and 4 NFE) and `ibmd` (from bridge, 1 NFE). FIDs chosen so that
# the Pareto front over NFE is ibmd@1, mm@2, diffusion/euler@4.
POINTS = [("diffusion", "teacher", "diffusion", s, n, f) for s, fids in
          {"ddim": [9.0, 6.0, 3.0], "euler": [9.5, 5.0, 2.0]}.items() for n, f in zip([1, 2, 4], fids)]
POINTS += [("bridge", "teacher", "bridge", "posterior", n, f) for n, f in zip([1, 2, 4], [8.0, 5.5, 2.5])]
POINTS += [("mm", "mm", "diffusion", "student", 2, 3.5), ("mm", "mm", "diffusion", "student", 4, 2.2),
           ("ibmd", "ibmd", "bridge", "student", 1, 4.0)]


def write_results(root):
    """fid_vs_nfe.csv, grids as the evaluate stage writes them (save_image, nrow = samples,
    padding 1, rows y, x0, then one per sampler), and one sweep."""
    table = pd.DataFrame(POINTS, columns=["model", "method", "teacher", "sampler", "nfe", "fid"])
    table = table.assign(kid=0.1, psnr=20.0, ssim=0.8, accuracy=0.9, sec_per_sample=table["nfe"] * 1e-3)
    results = root / "results"
    results.mkdir(parents=True)
    table.to_csv(results / "fid_vs_nfe.csv", index=False)
    g = torch.Generator().manual_seed(0)
    for model, points in table.groupby("model"):
        grids = results / "eval" / model / "grids"
        grids.mkdir(parents=True)
        index = {}
        for nfe, at in points.groupby("nfe"):
            labels = ["y (input)", "x0 (truth)", *sorted(at["sampler"])]
            index[f"nfe_{nfe:03d}.png"] = labels
            save_image(torch.rand(len(labels) * 4, 1, 8, 8, generator=g), grids / f"nfe_{nfe:03d}.png",
                       nrow=4, padding=1, pad_value=1.0)
        (grids / "rows.json").write_text(json.dumps(index))
    sweep = results / "sweeps" / "ibmd_lr"
    sweep.mkdir(parents=True)
    pd.DataFrame({"trial_id": ["a", "b", "c", "s", "e"], "status": ["finished"] * 3 + ["stopped", "error"],
                  "fid": [3.0, 1.5, 2.0, 1.0, None], "nfe": 1, "step": [40, 40, 40, 10, 0],
                  "mlflow_run_id": ["r1", "r2", "r3", "r4", "r5"],
                  "distill.ibmd.train.lr": [1e-4, 1e-3, 1e-2, 3e-3, 3e-4], "distill.ibmd.aux_updates": [2, 5, 5, 2, 5]}
                 ).to_csv(sweep / "trials.csv", index=False)
    (sweep / "best.json").write_text(json.dumps({
        "sweep": "ibmd_lr", "stage": "distill@ibmd", "metric": "fid", "mode": "min", "value": 1.5, "trial_id": "b",
        "config": {"distill.ibmd.train.lr": 1e-3, "distill.ibmd.aux_updates": 5}, "command": SWEEP_COMMAND}))


@pytest.mark.parametrize("store", ["empty", "missing"])
def test_notebook_on_a_fake_project_without_mlflow_runs(tmp_path, monkeypatch, store):
    root, db = tmp_path / "project", tmp_path / "mlflow.db"
    write_results(root)
    if store == "empty":
        sqlite3.connect(db).close()  # an empty file: MLflow finds no experiment in it
    monkeypatch.setenv("PIPELINE_PROJECT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    before = snapshot(root)
    found = sections(execute(NOTEBOOK, tmp_path))  # cwd outside the project: PIPELINE_PROJECT decides

    assert snapshot(root) == before  # nothing written into the project
    assert db.exists() == (store == "empty")  # a missing database is not created
    assert "MLflow note" in section(found, "Sources")[0]
    text, images = section(found, "1.")
    assert images == 1 and pareto_models(text) == ["ibmd", "mm", "diffusion"]
    assert section(found, "2.")[1] == 1
    assert section(found, "3.")[1] == 3  # one comparison per student NFE: 1, 2, 4
    text, images = section(found, "4.")
    assert images == 1 and SWEEP_COMMAND in text and "best fid = 1.5" in text
    trial_ids = [line.split()[0] for line in text.splitlines() if line.split()[:1] in map(list, "abcse")]
    assert trial_ids == ["s", "b", "c", "a", "e"]  # sorted by fid, the failed trial last
    text, _ = section(found, "5.")
    assert re.search(r"mm\s+diffusion\s+2\.2\s+4\s+2\s+euler @ 4\s+1\.1", text), text


@pytest.mark.slow
def test_notebook_on_the_smoke_project(project, monkeypatch):
    root, _ = project
    monkeypatch.setenv("PIPELINE_PROJECT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    found = sections(execute(root / "notebooks" / "compare.ipynb", root / "notebooks"))

    table = pd.read_csv(root / "results" / "fid_vs_nfe.csv")
    text = section(found, "Sources")[0]
    assert "group 'smoke'" in text and "only in the CSV: 0 | only in MLflow: 0" in text
    assert float(re.search(r"max \|fid\(CSV\) - fid\(MLflow\)\| = (\S+)", text).group(1)) < 1e-9
    text, images = section(found, "1.")
    assert images == 1 and pareto_models(text) and set(pareto_models(text)) <= set(table["model"])
    assert section(found, "2.")[1] == 1
    student_nfes = table.loc[table["method"] != "teacher", "nfe"].unique()
    assert section(found, "3.")[1] == len(student_nfes)
    text, images = section(found, "4.")
    if (root / "results" / "sweeps").exists():
        assert images >= 1 and "dvc exp run" in text
    else:
        assert "no sweeps under results/sweeps yet" in text
    text = section(found, "5.")[0]
    assert all(m in text for m in table.loc[table["method"] != "teacher", "model"].unique())
