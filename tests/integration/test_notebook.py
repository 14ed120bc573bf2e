"""notebooks/compare.ipynb: committed without outputs, and executed headless top to bottom
against a small fake results tree (points with intervals, the floor rows, the report's
comparisons and summary, no MLflow runs, one sweep) and, slow, against the smoke project
after `dvc repro`."""
import json
import re
import sqlite3

import nbformat
import pandas as pd
import pytest
import torch
from nbconvert.preprocessors import ExecutePreprocessor
from torchvision.utils import save_image

from pipeline.evaluation.results import COLUMNS
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


def pareto_models(text, title="Pareto front over NFE"):
    """Model names of the rows printed under `title` (the section's last table)."""
    lines = text.split(title)[1].splitlines()[2:]  # past the title and header
    return [line.split()[0] for line in lines if line.strip()]


def verdict_blocks(text):
    """{comparison kind: (count, verdict counts, its table)} as section 5 prints them: a
    `<kind> (<n>): <counts>` line, then the table, blocks separated by a blank line."""
    parts = re.split(r"\n(.+) \((\d+)\): (.+)\n", text)
    return {kind: (int(n), counts, body.split("\n\n")[0])
            for kind, n, counts, body in zip(parts[1::4], parts[2::4], parts[3::4], parts[4::4])}


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
# `mm` (from diffusion, 2 and 4 NFE), `pd` (from diffusion, 4 NFE) and `ibmd` (from bridge,
# 1 NFE), and the floor stage's `oracle` and `input` rows (NFE 0, no sampling time). FIDs
# chosen so that the Pareto front over NFE is ibmd@1, mm@2, diffusion/euler@4 (the oracle,
# at FID 1, would head it if the floor rows were not excluded).
POINTS = [("diffusion", "teacher", "diffusion", s, n, f) for s, fids in
          {"ddim": [9.0, 6.0, 3.0], "euler": [9.5, 5.0, 2.0]}.items() for n, f in zip([1, 2, 4], fids)]
POINTS += [("bridge", "teacher", "bridge", "posterior", n, f) for n, f in zip([1, 2, 4], [8.0, 5.5, 2.5])]
POINTS += [("mm", "mm", "diffusion", "student", 2, 3.5), ("mm", "mm", "diffusion", "student", 4, 2.2),
           ("pd", "pd", "diffusion", "student", 4, 2.3), ("ibmd", "ibmd", "bridge", "student", 1, 4.0)]
FLOOR = [("oracle", "reference", "", "x0", 0, 1.0), ("input", "reference", "", "y", 0, 6.0)]
HALF_WIDTH = 0.25  # of every paired difference's 95 % interval in comparisons.csv
COMPARISON_COLUMNS = ["comparison", "a", "b", "fid_a", "fid_b", "difference", "lo", "hi", "verdict"]


def fid_table():
    """fid_vs_nfe.csv: every metric with a 95 % interval (FID +- 0.3; the oracle's lower end
    below 0, as a small evaluation gives), in the report's columns."""
    table = pd.DataFrame(POINTS + FLOOR, columns=["model", "method", "teacher", "sampler", "nfe", "fid"])
    floor = table["method"] == "reference"
    table = table.assign(fid_lo=table["fid"] - 0.3, fid_hi=table["fid"] + 0.3)
    table.loc[table["model"] == "oracle", ["fid_lo", "fid_hi"]] = [-0.5, 2.5]
    for m, v in {"kid": 0.1, "psnr": 20.0, "ssim": 0.8, "accuracy": 0.9}.items():
        table = table.assign(**{m: v, f"{m}_lo": 0.9 * v, f"{m}_hi": 1.1 * v})
    table["sec_per_sample"] = table["nfe"] * 1e-3 * ~floor
    return table[list(COLUMNS)]


def name(row):
    return f"{row.model}/{row.sampler}@{row.nfe}"


def comparisons(table):
    """comparisons.csv as the report states them (docs/evaluation.md, 'Paired verdicts'):
    every point against its teacher's best, every student point against each teacher sampler
    at the same NFE, students of one teacher against each other at the same NFE (in the
    report's order, the last two kinds interleaved), each difference +- HALF_WIDTH."""
    models = table[table["method"] != "reference"]
    rows = []

    def add(kind, a, b):
        d = a.fid - b.fid
        lo, hi = d - HALF_WIDTH, d + HALF_WIDTH
        verdict = "better" if hi < 0 else "worse" if lo > 0 else "indistinguishable"
        rows.append([kind, name(a), name(b), a.fid, b.fid, d, lo, hi, verdict])

    def teacher(model):
        return models[(models["method"] == "teacher") & (models["model"] == model)]

    for t in models.loc[models["method"] == "teacher", "model"].unique():
        best = teacher(t).nsmallest(1, "fid").iloc[0]
        for point in models[(models["model"] == t) | (models["teacher"] == t)].itertuples():
            if name(point) != name(best):
                add("vs teacher's best", point, best)
    students = models[models["method"] != "teacher"]
    for st in students.itertuples():
        same = teacher(st.teacher)
        for t in same[same["nfe"] == st.nfe].itertuples():
            add("vs teacher at the same NFE", st, t)
        for other in students[(students["nfe"] == st.nfe) & (students["model"] > st.model)].itertuples():
            add("method vs method at the same NFE" + ("" if other.teacher == st.teacher else ", other teacher"),
                st, other)
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def summary(table, verdicts):
    """summary.md as the report opens it: the protocol, then per model (the teachers first)
    the fewest NFE whose comparison with the teacher's best point is not 'worse' (the best
    point itself: a difference of 0), then another section."""
    lines = ["| model | fewest NFE not worse than the teacher's best | FID there [95 %] | minus the teacher's best |",
             "|---|---|---|---|"]
    against_best = verdicts[verdicts["comparison"] == "vs teacher's best"].set_index("a")
    models = table[table["method"] != "reference"]
    for model, points in sorted(models.groupby("model"), key=lambda mp: mp[1]["method"].iloc[0] != "teacher"):
        for point in points.sort_values(["nfe", "fid"]).itertuples():
            c = against_best.loc[name(point)] if name(point) in against_best.index else None
            if c is None or c["verdict"] != "worse":
                d, lo, hi = (0.0, 0.0, 0.0) if c is None else (c["difference"], c["lo"], c["hi"])
                lines.append(f"| {model} | {point.nfe} | {point.fid:.3f} [{point.fid_lo:.3f}, {point.fid_hi:.3f}] | "
                             f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
                break
        else:
            lines.append(f"| {model} | not reached up to {points['nfe'].max()} | | |")
    return ("# How few network evaluations does each model need?\n\nclassifier FID of 100 inputs.\n\n"
            "## The answer\n\nTeachers first.\n\n" + "\n".join(lines)
            + "\n\n## Targets\n\n| target | verdict |\n|---|---|\n| next | section |\n")


def verdict_rows(table, verdicts):
    """verdicts.csv as the report writes it: per family, each curve's points with their
    difference to the teacher's best (the best point at 0), the oracle as a flat floor."""
    against_best = verdicts[verdicts["comparison"] == "vs teacher's best"].set_index("a")
    models, rows = table[table["method"] != "reference"], []
    for family in models.loc[models["method"] == "teacher", "model"].unique():
        members = models[(models["model"] == family) | (models["teacher"] == family)]
        best = members[members["method"] == "teacher"].nsmallest(1, "fid").iloc[0]
        for point in members.itertuples():
            curve = point.model if point.sampler == "student" else f"{point.model} / {point.sampler}"
            c = against_best.loc[name(point)] if name(point) in against_best.index else None
            d, lo, hi, v = (0.0, 0.0, 0.0, "the teacher's best") if c is None else (
                c["difference"], c["lo"], c["hi"], c["verdict"])
            rows.append([family, curve, point.nfe, name(point), d, lo, hi, v])
        oracle = table[table["model"] == "oracle"].iloc[0]
        for nfe in (members["nfe"].min(), members["nfe"].max()):
            d = oracle["fid"] - best["fid"]
            rows.append([family, "oracle (floor)", nfe, "oracle/x0@0", d, d - HALF_WIDTH, d + HALF_WIDTH, "better"])
    return pd.DataFrame(rows, columns=["family", "curve", "nfe", "point", "difference", "lo", "hi", "verdict"])


def write_results(root):
    """fid_vs_nfe.csv, comparisons.csv, summary.md, grids as the evaluate stage writes them
    (save_image, nrow = samples, padding 1, rows y, x0, then one per sampler; the floor has
    none), and one sweep."""
    table = fid_table()
    verdicts = comparisons(table)
    results = root / "results"
    results.mkdir(parents=True)
    table.to_csv(results / "fid_vs_nfe.csv", index=False)
    verdicts.to_csv(results / "comparisons.csv", index=False)
    (results / "summary.md").write_text(summary(table, verdicts))
    verdict_rows(table, verdicts).to_csv(results / "verdicts.csv", index=False)
    g = torch.Generator().manual_seed(0)
    for model, points in table[table["method"] != "reference"].groupby("model"):
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
    text = section(found, "Sources")[0]
    assert "MLflow note" in text
    assert f"{len(POINTS)} points and {len(FLOOR)} floor rows" in text
    assert re.search(r"oracle\s+x0\s+1 \[-0\.5, 2\.5\]\s+0\.1 \[0\.09, 0\.11\]", text), text
    assert re.search(r"mm\s+mm\s+diffusion\s+1\s+2,4\s+student\s+4\s+2\.2 \[1\.9, 2\.5\]", text), text

    text, images = section(found, "1.")
    assert images == 1 and pareto_models(text) == ["ibmd", "mm", "diffusion"]  # the floor rows are not on it
    assert re.search(r"mm\s+student\s+2\s+3\.5 \[3\.2, 3\.8\]\s+0\.002", text), text  # intervals in the table
    assert "floor lines: oracle (x0): FID 1 [-0.5, 2.5] | input (y): FID 6 [5.7, 6.3]" in text
    text, images = section(found, "2.")
    assert images == 1 and pareto_models(text, "Pareto front over seconds") == ["ibmd", "mm", "diffusion"]
    assert "floor lines: oracle (x0)" in text
    text, images = section(found, "3.")
    assert images == 3 and "no teacher grid" not in text  # one comparison per student NFE: 1, 2, 4; no floor

    text, images = section(found, "4.")
    assert images == 1 and SWEEP_COMMAND in text and "best fid = 1.5" in text
    trial_ids = [line.split()[0] for line in text.splitlines() if line.split()[:1] in map(list, "abcse")]
    assert trial_ids == ["s", "b", "c", "a", "e"]  # sorted by fid, the failed trial last

    text, _ = section(found, "5.")
    assert "excludes 0" in text and "student / teacher" not in text  # paired verdicts, not ratios
    blocks = verdict_blocks(text)
    assert list(blocks) == ["vs teacher's best", "vs teacher at the same NFE", "method vs method at the same NFE"]
    assert [b[:2] for b in blocks.values()] == [(11, "indistinguishable 1, worse 10"),
                                                (7, "better 5, indistinguishable 1, worse 1"),
                                                (1, "indistinguishable 1")]
    assert all(len(table.splitlines()) == 1 + n for n, _, table in blocks.values())  # header + one row each
    same_nfe = blocks["vs teacher at the same NFE"][2]
    assert re.search(r"mm/student@4\s+diffusion/euler@4\s+2\.2\s+2\s+\+0\.2 \[-0\.05, \+0\.45\]\s+indistinguishable",
                     same_nfe), same_nfe
    assert re.search(r"pd/student@4\s+diffusion/euler@4\s+2\.3\s+2\s+\+0\.3 \[\+0\.05, \+0\.55\]\s+worse", same_nfe)
    assert re.search(r"ibmd/student@1\s+bridge/posterior@1\s+4\s+8\s+-4 \[-4\.25, -3\.75\]\s+better", same_nfe)
    assert re.search(r"mm/student@4\s+pd/student@4\s+2\.2\s+2\.3\s+-0\.1 \[-0\.35, \+0\.15\]\s+indistinguishable",
                     blocks["method vs method at the same NFE"][2])
    reach = text.split("The answer (results/summary.md):")[1]
    assert re.search(r"mm\s+4\s+2\.200 \[1\.900, 2\.500\]\s+\+0\.200 \[-0\.050, \+0\.450\]", reach), reach
    assert [line.split()[0] for line in reach.strip().splitlines()[1:]] == ["bridge", "diffusion", "ibmd", "mm", "pd"]
    assert "next" not in reach  # one row per model; the next section not read
    text, images = section(found, "6.")
    assert images == 1 and "mm: 4" in text and "pd" not in text.split("fewest NFE):")[1]  # pd is worse everywhere
    markdown = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.source.startswith("## 5."))
    assert "excludes 0" in markdown


@pytest.mark.slow
def test_notebook_on_the_smoke_project(project, monkeypatch):
    root, env = project
    monkeypatch.setenv("PIPELINE_PROJECT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # the smoke chain's server
    found = sections(execute(root / "notebooks" / "compare.ipynb", root / "notebooks"))

    table = pd.read_csv(root / "results" / "fid_vs_nfe.csv")
    floor, models = table[table["method"] == "reference"], table[table["method"] != "reference"]
    students = models[models["method"] != "teacher"]
    text = section(found, "Sources")[0]
    assert set(floor["model"]) == {"oracle", "input"} and f"{len(floor)} floor rows" in text
    assert "group 'smoke'" in text and "only in the CSV: 0 | only in MLflow: 0" in text  # the floor runs too
    assert float(re.search(r"max \|fid\(CSV\) - fid\(MLflow\)\| = (\S+)", text).group(1)) < 1e-9
    assert float(re.search(r"over fid_lo, fid_hi = (\S+)", text).group(1)) < 1e-9
    text, images = section(found, "1.")
    assert images == 1 and pareto_models(text) and set(pareto_models(text)) <= set(models["model"])
    assert "floor lines: oracle (x0)" in text
    text, images = section(found, "2.")
    assert images == 1 and set(pareto_models(text, "Pareto front over seconds")) <= set(models["model"])
    assert section(found, "3.")[1] == len(students["nfe"].unique())
    text, images = section(found, "4.")
    if (root / "results" / "sweeps").exists():
        assert images >= 1 and "dvc exp run" in text
    else:
        assert "no sweeps under results/sweeps yet" in text
    text = section(found, "5.")[0]
    verdicts = pd.read_csv(root / "results" / "comparisons.csv")
    blocks = verdict_blocks(text)
    assert {k: n for k, (n, _, _) in blocks.items()} == verdicts["comparison"].value_counts().to_dict()
    assert all(m in text for m in students["model"].unique())
    assert "The answer (results/summary.md):" in text
    text, images = section(found, "6.")
    assert images == 1 and "not worse than the teacher's best" in text
