"""notebooks/compare.ipynb: committed without outputs, and executed headless top to bottom
against a small fake results tree (points with intervals, the floor rows, the report's
comparisons, summary and protocol, no MLflow runs, one sweep, another run to compare with)
and, slow, against the smoke project after `dvc repro`."""
import json
import math
import re
import shutil
import sqlite3

import nbformat
import pandas as pd
import pytest
import torch
from nbconvert.preprocessors import ExecutePreprocessor
from scipy import stats
from torchvision.utils import save_image

from pipeline.evaluation.results import COLUMNS
from pipeline.report.protocol import CHECKPOINT_RULE, TEACHER_BEST_RULE, VERDICT_FAMILIES, differences
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
    """{(comparison kind, metric): (count, verdict counts, its table)} as section 5 prints them: a
    `<kind>, on <metric> (<n>): <counts>` line, then the table, blocks separated by a blank line."""
    parts = re.split(r"\n(.+), on (\w+) \((\d+)\): (.+)\n", text)
    return {(kind, metric): (int(n), counts, body.split("\n\n")[0]) for kind, metric, n, counts, body
            in zip(parts[1::5], parts[2::5], parts[3::5], parts[4::5], parts[5::5])}


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
# at FID 1, would head it if the floor rows were not excluded). Precision and recall per
# model, at every NFE: mm trades diversity for fidelity (higher precision, lower recall).
POINTS = [("diffusion", "teacher", "diffusion", s, n, f) for s, fids in
          {"ddim": [9.0, 6.0, 3.0], "euler": [9.5, 5.0, 2.0]}.items() for n, f in zip([1, 2, 4], fids)]
POINTS += [("bridge", "teacher", "bridge", "posterior", n, f) for n, f in zip([1, 2, 4], [8.0, 5.5, 2.5])]
POINTS += [("mm", "mm", "diffusion", "student", 2, 3.5), ("mm", "mm", "diffusion", "student", 4, 2.2),
           ("pd", "pd", "diffusion", "student", 4, 2.3), ("ibmd", "ibmd", "bridge", "student", 1, 4.0)]
FLOOR = [("oracle", "reference", "", "x0", 0, 1.0), ("input", "reference", "", "y", 0, 6.0)]
PRECISION_RECALL = {"diffusion": (0.7, 0.6), "bridge": (0.65, 0.55), "mm": (0.8, 0.45), "pd": (0.7, 0.6),
                    "ibmd": (0.72, 0.5), "oracle": (0.75, 0.75), "input": (0.1, 0.05)}
HALF_WIDTH = {"fid": 0.25, "precision": 0.02, "recall": 0.02}  # of every paired difference's interval
COMPARISON_COLUMNS = ["comparison", "a", "b", "metric", "value_a", "value_b", "difference", "se", "lo", "hi",
                      "verdict", "p", "q"]


def fid_table():
    """fid_vs_nfe.csv: every metric with a 95 % interval (FID +- 0.3; the oracle's lower end
    below 0, as a small evaluation gives), in the report's columns."""
    table = pd.DataFrame(POINTS + FLOOR, columns=["model", "method", "teacher", "sampler", "nfe", "fid"])
    floor = table["method"] == "reference"
    table = table.assign(fid_lo=table["fid"] - 0.3, fid_hi=table["fid"] + 0.3)
    table.loc[table["model"] == "oracle", ["fid_lo", "fid_hi"]] = [-0.5, 2.5]
    for m, v in {"kid": 0.1, "psnr": 20.0, "ssim": 0.8, "accuracy": 0.9}.items():
        table = table.assign(**{m: v, f"{m}_lo": 0.9 * v, f"{m}_hi": 1.1 * v})
    for i, m in enumerate(["precision", "recall"]):
        v = table["model"].map(lambda model: PRECISION_RECALL[model][i])
        table = table.assign(**{m: v, f"{m}_lo": v - 0.05, f"{m}_hi": v + 0.05})
    table["sec_per_sample"] = table["nfe"] * 1e-3 * ~floor
    return table[list(COLUMNS)]


def name(row):
    return f"{row.model}/{row.sampler}@{row.nfe}"


def comparisons(table):
    """comparisons.csv as the report states them (docs/evaluation.md, 'Paired verdicts'): on FID,
    every point and the floor against its teacher's best (one point, both halves' choice); at
    the same NFE on FID, precision and recall, every student point against each teacher sampler
    and students of one teacher against each other (in the report's order, the last two kinds
    interleaved). Each difference +- HALF_WIDTH, its two-sided p-value, and q (Benjamini-Hochberg)."""
    models = table[table["method"] != "reference"]
    rows = []

    def add(kind, a, b, metric="fid"):
        value_a, value_b, half = getattr(a, metric), getattr(b, metric), HALF_WIDTH[metric]
        d, se = value_a - value_b, half / 1.96
        lo, hi = d - half, d + half
        better, worse = (hi < 0, lo > 0) if metric == "fid" else (lo > 0, hi < 0)
        verdict = "better" if better else "worse" if worse else "indistinguishable"
        rows.append([kind, name(a), name(b), metric, value_a, value_b, d, se, lo, hi, verdict,
                     math.erfc(abs(d) / se / math.sqrt(2))])

    def teacher(model):
        return models[(models["method"] == "teacher") & (models["model"] == model)]

    for t in models.loc[models["method"] == "teacher", "model"].unique():
        best = teacher(t).nsmallest(1, "fid").iloc[0]
        for point in models[(models["model"] == t) | (models["teacher"] == t)].itertuples():
            if name(point) != name(best):
                add("vs teacher's best", point, best)
        for floor in table[table["method"] == "reference"].itertuples():
            add("floor vs teacher's best", floor, best)
    students = models[models["method"] != "teacher"]
    for st in students.itertuples():
        same = teacher(st.teacher)
        for metric in ("fid", "precision", "recall"):
            for t in same[same["nfe"] == st.nfe].itertuples():
                add("vs teacher at the same NFE", st, t, metric)
            for other in students[(students["nfe"] == st.nfe) & (students["model"] > st.model)].itertuples():
                add("method vs method at the same NFE" + ("" if other.teacher == st.teacher else ", other teacher"),
                    st, other, metric)
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS[:-1])
    return out.assign(q=stats.false_discovery_control(out["p"]))


def protocol(verdicts):
    """protocol.json as the report writes it (pipeline/report/protocol.py)."""
    return {
        "extractor": {"name": "classifier", "fid_name": "classifier FID", "input": "the samples as drawn"},
        "evaluated_inputs": {"split": "test", "n": 100, "jackknife_groups": 10},
        "reference": {"split": "reference", "n": 200},
        "sampling_seeds": [0, 1],
        "training_seeds": [0],
        "grid": "fair",
        "checkpoint_rule": CHECKPOINT_RULE,
        "teacher_best": TEACHER_BEST_RULE,
        "verdict_families": VERDICT_FAMILIES,
        "family_levels": {"summary": {"comparisons": 11, "critical_value": 2.7},
                          "comparisons": {"comparisons": len(verdicts), "interval_level": 0.988}},
        "code_commit": "c663c10",
    }


def summary(table, verdicts, protocol):
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
    return ("# How few network evaluations does each model need?\n\n**classifier FID** of 100 evaluated test "
            "inputs' samples against 200 reference images.  \nVerdicts here hold jointly at 95 % over their 11 "
            "comparisons; comparisons.md holds a false discovery rate of 5 %.  \n"
            "One training seed (0): these verdicts do not include "
            "the variance of retraining.\n\n"
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
            rows.append([family, "oracle (floor)", nfe, "oracle/x0@0", d, d - HALF_WIDTH["fid"], d + HALF_WIDTH["fid"],
                         "better"])
    return pd.DataFrame(rows, columns=["family", "curve", "nfe", "point", "difference", "lo", "hi", "verdict"])


def write_results(root):
    """fid_vs_nfe.csv, comparisons.csv, summary.md, verdicts.csv and protocol.json as the report
    writes them, grids as the evaluate stage does (save_image, nrow = samples, padding 1, rows y,
    x0, then one per sampler; the floor has none), and one sweep."""
    table = fid_table()
    verdicts = comparisons(table)
    results = root / "results"
    results.mkdir(parents=True)
    table.to_csv(results / "fid_vs_nfe.csv", index=False)
    verdicts.to_csv(results / "comparisons.csv", index=False)
    (results / "summary.md").write_text(summary(table, verdicts, protocol(verdicts)))
    (results / "protocol.json").write_text(json.dumps(protocol(verdicts), indent=2) + "\n")
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


def other_run(root, tmp_path, other):
    """Another run to compare with (PIPELINE_COMPARE): a copy of the project whose protocol
    differs in its code commit, in its sampling seeds too, or that this run's lacks (an older
    report). Returns the folder to name and the two protocols (this run's: None if removed)."""
    shutil.copytree(root, tmp_path / "other")
    ours = json.loads((root / "results" / "protocol.json").read_text())
    theirs = ours | {"code_commit": "0000000+changes"}
    if other == "other seeds":
        theirs["sampling_seeds"] = [0, 1, 2]
    (tmp_path / "other" / "results" / "protocol.json").write_text(json.dumps(theirs))
    if other == "no protocol":
        (root / "results" / "protocol.json").unlink()
        ours = None
    folder = tmp_path / "other"
    return (folder / "results" if other == "other seeds" else folder), ours, theirs  # either names a run


def p_q(verdicts, a, b, metric):
    """The p and q cells of one comparison, as the notebook prints them."""
    row = verdicts[(verdicts["a"] == a) & (verdicts["b"] == b) & (verdicts["metric"] == metric)].iloc[0]
    return rf"\s+{re.escape(f'{row.p:.4g}')}\s+{re.escape(f'{row.q:.4g}')}\s+"


@pytest.mark.parametrize("store, other", [("empty", "same protocol"), ("missing", "other seeds"),
                                          ("missing", "no protocol")])
def test_notebook_on_a_fake_project_without_mlflow_runs(tmp_path, monkeypatch, store, other):
    root, db = tmp_path / "project", tmp_path / "mlflow.db"
    write_results(root)
    compare, ours, theirs = other_run(root, tmp_path, other)
    if store == "empty":
        sqlite3.connect(db).close()  # an empty file: MLflow finds no experiment in it
    monkeypatch.setenv("PIPELINE_PROJECT", str(root))
    monkeypatch.setenv("PIPELINE_COMPARE", str(compare))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    before = snapshot(root)
    found = sections(execute(NOTEBOOK, tmp_path))  # cwd outside the project: PIPELINE_PROJECT decides

    assert snapshot(root) == before  # nothing written into the project
    assert db.exists() == (store == "empty")  # a missing database is not created
    text = section(found, "Sources")[0]
    assert "MLflow note" in text
    assert f"{len(POINTS)} points and {len(FLOOR)} floor rows" in text
    assert re.search(r"oracle\s+x0\s+1 \[-0\.5, 2\.5\]\s+0\.1 \[0\.09, 0\.11\]\s+0\.75 \[0\.7, 0\.8\]", text), text
    assert re.search(r"mm\s+mm\s+diffusion\s+1\s+2,4\s+student\s+4\s+2\.2 \[1\.9, 2\.5\]", text), text

    text = section(found, "The protocol")[0]
    if ours is None:
        assert "protocol note: no " in text and "this run has no protocol.json; the protocols are not compared" in text
    else:
        assert "sampling_seeds: 0, 1\n" in text and "    fid_name: classifier FID\n" in text, text
        assert "One training seed (0): these verdicts do not include the variance of retraining." in text
        differ = differences(ours, theirs)  # the report's rule: the code commit is not compared
        assert list(differ) == ([] if other == "same protocol" else ["sampling_seeds"])
        if differ:
            named = text.split("the protocols differ in 1 field(s)")[1].splitlines()[1:]
            assert [line.split(":")[0].strip() for line in named if line.strip()] == list(differ), text
            assert "  sampling_seeds: this run 0, 1 | the other 0, 1, 2" in text and "protocols agree" not in text
        else:
            assert "protocols agree" in text and "the protocols differ" not in text

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
    assert ("false discovery rate 5 %, intervals at 98.8 %" in text) == (ours is not None)  # the level, as stated
    blocks = verdict_blocks(text)
    same, pair = "vs teacher at the same NFE", "method vs method at the same NFE"
    assert {kind_metric: block[:2] for kind_metric, block in blocks.items()} == {  # in this order: FID first
        ("vs teacher's best", "fid"): (11, "indistinguishable 1, worse 10"),
        ("floor vs teacher's best", "fid"): (4, "better 2, worse 2"),
        (same, "fid"): (7, "better 5, indistinguishable 1, worse 1"),
        (same, "precision"): (7, "better 5, indistinguishable 2"),
        (same, "recall"): (7, "indistinguishable 2, worse 5"),
        (pair, "fid"): (1, "indistinguishable 1"),
        (pair, "precision"): (1, "better 1"),
        (pair, "recall"): (1, "worse 1")}
    assert list(blocks) == [("vs teacher's best", "fid"), ("floor vs teacher's best", "fid"), (same, "fid"),
                            (same, "precision"), (same, "recall"), (pair, "fid"), (pair, "precision"), (pair, "recall")]
    assert all(len(table.splitlines()) == 1 + n for n, _, table in blocks.values())  # header + one row each
    assert all(re.search(rf"{m}\(a\)\s+{m}\(b\)\s+{m}\(a\) - {m}\(b\) \[interval\]\s+p\s+q\s+verdict$",
                         table.splitlines()[0]) for (_, m), (_, _, table) in blocks.items())
    verdicts = comparisons(fid_table())
    same_nfe = blocks[(same, "fid")][2]
    assert re.search(r"mm/student@4\s+diffusion/euler@4\s+2\.2\s+2\s+\+0\.2 \[-0\.05, \+0\.45\]"
                     + p_q(verdicts, "mm/student@4", "diffusion/euler@4", "fid") + "indistinguishable", same_nfe)
    assert re.search(r"pd/student@4\s+diffusion/euler@4\s+2\.3\s+2\s+\+0\.3 \[\+0\.05, \+0\.55\]\s+\S+\s+\S+\s+worse",
                     same_nfe)
    assert re.search(r"ibmd/student@1\s+bridge/posterior@1\s+4\s+8\s+-4 \[-4\.25, -3\.75\]\s+\S+\s+\S+\s+better",
                     same_nfe)
    assert re.search(r"mm/student@4\s+pd/student@4\s+2\.2\s+2\.3\s+-0\.1 \[-0\.35, \+0\.15\]\s+\S+\s+\S+\s+"
                     "indistinguishable", blocks[(pair, "fid")][2])
    # higher is better for precision and recall: mm gains fidelity and loses diversity
    assert re.search(r"mm/student@4\s+pd/student@4\s+0\.8\s+0\.7\s+\+0\.1 \[\+0\.08, \+0\.12\]"
                     + p_q(verdicts, "mm/student@4", "pd/student@4", "precision") + "better",
                     blocks[(pair, "precision")][2])
    assert re.search(r"mm/student@4\s+pd/student@4\s+0\.45\s+0\.6\s+-0\.15 \[-0\.17, -0\.13\]\s+\S+\s+\S+\s+worse",
                     blocks[(pair, "recall")][2])
    assert re.search(r"oracle/x0@0\s+diffusion/euler@4\s+1\s+2\s+-1 \[-1\.25, -0\.75\]\s+\S+\s+\S+\s+better",
                     blocks[("floor vs teacher's best", "fid")][2])
    reach = text.split("The answer (results/summary.md):")[1]
    assert re.search(r"mm\s+4\s+2\.200 \[1\.900, 2\.500\]\s+\+0\.200 \[-0\.050, \+0\.450\]", reach), reach
    assert [line.split()[0] for line in reach.strip().splitlines()[1:]] == ["bridge", "diffusion", "ibmd", "mm", "pd"]
    assert "next" not in reach  # one row per model; the next section not read
    text, images = section(found, "6.")
    assert images == 1 and "mm: 4" in text and "pd" not in text.split("fewest NFE):")[1]  # pd is worse everywhere
    assert ("bands: the summary's family, simultaneous 95 %" in text) == (ours is not None)
    markdown = {c.source[3:5]: c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
                if c.source.startswith(("## 5.", "## 6."))}
    assert "excludes 0" in markdown["5."] and "false discovery rate" in markdown["5."]
    assert "the summary's intervals, simultaneous 95 %" in markdown["6."]


@pytest.mark.slow
def test_notebook_on_the_smoke_project(project, monkeypatch):
    root, env = project
    monkeypatch.setenv("PIPELINE_PROJECT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # the smoke chain's server
    monkeypatch.delenv("PIPELINE_COMPARE", raising=False)
    found = sections(execute(root / "notebooks" / "compare.ipynb", root / "notebooks"))

    table = pd.read_csv(root / "results" / "fid_vs_nfe.csv")
    floor, models = table[table["method"] == "reference"], table[table["method"] != "reference"]
    students = models[models["method"] != "teacher"]
    text = section(found, "Sources")[0]
    assert set(floor["model"]) == {"oracle", "input"} and f"{len(floor)} floor rows" in text
    assert "group 'smoke'" in text and "only in the CSV: 0 | only in MLflow: 0" in text  # the floor runs too
    assert float(re.search(r"max \|fid\(CSV\) - fid\(MLflow\)\| = (\S+)", text).group(1)) < 1e-9
    assert float(re.search(r"over fid_lo, fid_hi = (\S+)", text).group(1)) < 1e-9
    text = section(found, "The protocol")[0]
    protocol = json.loads((root / "results" / "protocol.json").read_text())
    assert "protocol note" not in text and f"sampling_seeds: {', '.join(map(str, protocol['sampling_seeds']))}" in text
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
    assert {k: n for k, (n, _, _) in blocks.items()} == verdicts.groupby(["comparison", "metric"]).size().to_dict()
    kinds = list(dict.fromkeys(verdicts["comparison"]))
    assert list(blocks) == sorted(blocks, key=lambda km: (kinds.index(km[0]), km[1] != "fid", km[1]))  # FID first
    assert all(m in text for m in students["model"].unique())
    assert "The answer (results/summary.md):" in text
    text, images = section(found, "6.")
    assert images == 1 and "not worse than the teacher's best" in text
