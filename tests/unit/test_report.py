"""The report on hand-made evaluation folders: paired verdicts, the answer table (one row per
model, teachers first, no empty or nan cell), samplers that reach the same sample compared
once, the targets' verdicts, the verdict picture's data equal to comparisons.csv, and the
headline metrics."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.results import METRICS, point_key, write_evaluation
from pipeline.report import write_report
from pipeline.report.family import summary_critical, summary_family
from pipeline.report.points import Results
from pipeline.report.targets import check
from pipeline.report.verdicts import answer, comparisons, fewest_nfe, pareto_front, speedups


def write_folder(root, model, method, teacher, points, groups=10, seed=0, folder=None):
    """An evaluation folder whose replicates are estimate + noise: {(sampler, nfe): (fid, spread, sec)},
    on the whole of the inputs and on each half (the halves' replicates: every other group's).
    Every folder draws its noise from `seed`, so the noise is shared (paired) across folders."""
    rows, reps = [], {}
    for (sampler, nfe), (fid, spread, sec) in points.items():
        r = fid + spread * np.random.default_rng(seed).standard_normal(groups)
        rows.append({"model": model, "method": method, "teacher": teacher, "sampler": sampler, "nfe": nfe,
                     **{m: float("nan") for m in METRICS}, "fid": fid, "fid_lo": fid - 2 * spread,
                     "fid_hi": fid + 2 * spread, "sec_per_sample": sec})
        reps[point_key(sampler, nfe)] = {"fid": list(r), "halves": {"fid": [
            {"estimate": fid, "replicates": list(r[h::2])} for h in range(2)]}}
    write_evaluation(root / (folder or model), rows, reps, {}, {"n": 100, "groups": groups, "seeds": [1, 2]})
    return root / (folder or model)


SHARED = 0.02
INFO = {"extractor": "classifier", "fid_name": "classifier FID", "n_reference": 1000}  # the features stage's info.json


@pytest.fixture
def folders(tmp_path):
    """A diffusion teacher (ddim and euler reach the same sample at 1 NFE), three students: mm
    reaches the teacher's best at 4 NFE, pd never does, cd at 2 but not at 1; and the floor."""
    return [
        write_folder(tmp_path, "diffusion", "teacher", "diffusion",
                     {("ddim", 1): (9.0, SHARED, 1.0), ("ddim", 8): (2.0, SHARED, 8.0),
                      ("ddim", 32): (1.0, SHARED, 32.0), ("euler", 1): (9.0, SHARED, 1.1),
                      ("euler", 8): (3.0, SHARED, 8.0)}),
        write_folder(tmp_path, "mm", "mm", "diffusion", {("student", 4): (1.0, SHARED, 2.0)}),
        write_folder(tmp_path, "pd", "pd", "diffusion", {("student", 4): (1.5, SHARED, 2.0)}),
        write_folder(tmp_path, "cd", "cd", "diffusion",
                     {("student", 1): (5.0, SHARED, 0.5), ("student", 2): (1.0, SHARED, 1.0)}),
        write_folder(tmp_path, "oracle", "reference", "", {("x0", 0): (0.4, SHARED, 0.0)}, folder="floor"),
    ]


def test_verdicts_speed_ups_and_the_fewest_nfe(folders):
    results = Results(folders)
    verdicts = comparisons(results).set_index(["comparison", "a"])
    assert verdicts.loc[("vs teacher's best", "mm/student@4"), "verdict"] == "indistinguishable"  # equal FID
    assert verdicts.loc[("vs teacher's best", "pd/student@4"), "verdict"] == "worse"
    assert verdicts.loc[("method vs method at the same NFE", "mm/student@4"), "verdict"] == "better"
    assert verdicts.loc[("floor vs teacher's best", "oracle/x0@0"), "verdict"] == "better"
    reach = fewest_nfe(results).set_index(["model", "sampler"])
    assert reach.loc[("mm", "student"), "nfe"] == "4" and reach.loc[("diffusion", "ddim"), "nfe"] == "32"
    assert reach.loc[("pd", "student"), "nfe"] == "not reached up to 4"
    ups = speedups(results).set_index("student")
    assert ups.loc["mm@4", "speed-up (measured)"] == 16.0  # the teacher needs 32 NFE (32 s) for mm's FID
    assert ups.loc["pd@4", "teacher point as good"].startswith("ddim@32")  # cheapest not worse than pd


def test_the_same_sample_from_two_samplers_is_compared_once(folders):
    results = Results(folders)
    assert results.alias_of == {("diffusion", "euler", 1): "ddim"}  # equal replicates; euler@8 differs
    verdicts = comparisons(results)
    at_one = verdicts[verdicts["a"].str.startswith("diffusion/") & verdicts["a"].str.endswith("@1")]
    assert list(at_one["a"]) == ["diffusion/{ddim,euler}@1"]
    same_nfe = verdicts[(verdicts["comparison"] == "vs teacher at the same NFE") & (verdicts["a"] == "cd/student@1")]
    assert list(same_nfe["b"]) == ["diffusion/{ddim,euler}@1"]  # not once per sampler


def test_the_answer_has_one_filled_row_per_model_teachers_first(folders, tmp_path):
    write_report(folders, tmp_path / "out", INFO)
    summary = (tmp_path / "out" / "summary.md").read_text()
    sections = [line for line in summary.splitlines() if line.startswith("## ")]
    assert sections[0] == "## The answer"  # right after the title and the protocol
    assert "100 evaluated test inputs" in summary and "1000 reference images" in summary and "seeds 1, 2" in summary
    table = [line for line in summary.split("## The answer")[1].split("\n\n")[2].splitlines()[2:]]
    models = [line.split(" | ")[0].lstrip("| ").split(" ")[0] for line in table]
    assert models == ["diffusion", "cd", "mm", "pd"]  # the teacher, then by the NFE needed (2, 4, never)
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(cells) and not any("nan" in c for c in cells), line
    assert "nan" not in summary
    assert "not reached at 4" in summary  # pd, evaluated at 4 NFE only
    assert "## Pareto front" not in summary and "## Pareto front" in (tmp_path / "out" / "comparisons.md").read_text()


def test_targets_are_met_missed_or_indistinguishable(folders):
    results = Results(folders)

    def verdict(**target):
        return check(results, SimpleNamespace(**{"than": "teacher_best", "than_nfe": None, "by": None, **target}))[1]

    assert verdict(model="mm", nfe=4, claim="not_worse") == "met"  # indistinguishable from the best
    assert verdict(model="mm", nfe=4, claim="better") == "indistinguishable"
    assert verdict(model="pd", nfe=4, claim="not_worse") == "missed"
    assert verdict(model="mm", nfe=4, claim="better", than="pd") == "met"
    # Across NFE (than_nfe): cd@1 (FID 5.0) against mm@4 (1.0), mm@4 against cd@2 (1.0); no cd@3.
    assert verdict(model="cd", nfe=1, claim="not_worse", than="mm", than_nfe=4) == "missed"
    assert verdict(model="mm", nfe=4, claim="better", than="cd", than_nfe=2) == "indistinguishable"
    assert verdict(model="mm", nfe=4, claim="better", than="cd", than_nfe=1) == "met"
    assert verdict(model="mm", nfe=4, claim="better", than="cd", than_nfe=3) == "not evaluated"
    assert verdict(model="mm", nfe=4, claim="better", than="cd") == "not evaluated"  # cd has no 4-NFE point
    assert verdict(model="cd", nfe=2, claim="better", than="teacher_same_nfe") == "not evaluated"  # no teacher @ 2
    assert verdict(model="mm", nfe=8, claim="not_worse") == "not evaluated"
    assert verdict(model="mm", nfe=4, claim="faster", by=16.0) == "met"  # 2 s against ddim@32's 32 s
    assert verdict(model="mm", nfe=4, claim="faster", by=17.0) == "missed"


def test_the_verdict_picture_draws_the_summarys_comparisons(folders, tmp_path):
    write_report(folders, tmp_path / "out", INFO)
    rows = pd.read_csv(tmp_path / "out" / "verdicts.csv")
    stated = pd.read_csv(tmp_path / "out" / "comparisons.csv")
    stated = stated[stated["comparison"].isin(["vs teacher's best", "floor vs teacher's best"])]
    drawn = rows[rows["verdict"] != "the teacher's best"].merge(stated, left_on="point", right_on="a",
                                                                suffixes=("", "_stated"))
    assert len(drawn) == (rows["verdict"] != "the teacher's best").sum()  # every drawn point is a stated one
    assert (drawn["difference"] == drawn["difference_stated"]).all()  # the same comparison, at another level
    assert set(stated["a"]) <= set(rows["point"])  # and every stated one is drawn
    results = Results(folders)
    results.critical = summary_critical(summary_family(results))
    by_label = {results.label(r): r for _, r in results.models.iterrows()}
    for _, row in rows[rows["curve"].str.contains("floor") == False].iterrows():  # noqa: E712
        c = results.vs_best(by_label[row["point"]])
        assert (c.lo, c.hi) == pytest.approx((row["lo"], row["hi"]), abs=0) or row["verdict"] == "the teacher's best"
    best = rows[rows["verdict"] == "the teacher's best"]
    assert list(best["point"]) == ["diffusion/ddim@32"] and (best["difference"] == 0).all()
    # Both samplers' curves start at the shared 1-NFE point.
    assert set(rows.loc[rows["nfe"] == 1, "curve"]) >= {"diffusion / ddim", "diffusion / euler"}
    assert (tmp_path / "out" / "verdicts.png").stat().st_size > 0


def test_headline_metrics_per_model(folders, tmp_path):
    write_report(folders, tmp_path / "out", INFO)
    headline = json.loads((tmp_path / "out" / "headline.json").read_text())
    assert set(headline) == {"diffusion", "mm", "pd", "cd"}
    assert headline["mm"] == {"fewest_nfe": 4, "fid": 1.0, "teacher_best_fid": 1.0, "speedup": 16.0}
    assert headline["pd"]["fewest_nfe"] is None and headline["pd"]["fid"] == 1.5
    assert headline["diffusion"] == {"fewest_nfe": 32, "fid": 1.0, "teacher_best_fid": 1.0, "speedup": 1.0}


def test_pareto_front_keeps_only_undominated_points():
    table = pd.DataFrame({"model": ["a", "a", "b", "b", "c"], "nfe": [1, 4, 1, 2, 8],
                          "fid": [10.0, 3.0, 12.0, 5.0, 4.0]})
    front = pareto_front(table)
    assert list(zip(front["nfe"], front["fid"])) == [(1, 10.0), (2, 5.0), (4, 3.0)]


def test_answer_orders_students_by_the_nfe_they_need(folders):
    order = [e["model"] for e in answer(Results(folders))]
    assert order == ["diffusion", "cd", "mm", "pd"]  # cd reaches at 2 NFE, mm at 4, pd not at all


def test_each_list_states_its_family_and_the_protocol_travels_with_it(folders, tmp_path):
    write_report(folders, tmp_path / "out", INFO, grid="fair", training_seeds=[0], commit="abc")
    stated = pd.read_csv(tmp_path / "out" / "comparisons.csv")
    assert (stated["q"] >= stated["p"]).all() and stated[["p", "q"]].notna().all().all()
    lower = stated["metric"] == "fid"
    assert ((stated["verdict"] == "better") == ((stated["hi"] < 0) & lower | (stated["lo"] > 0) & ~lower)).all()
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["evaluated_inputs"] == {"split": "test", "n": 100, "jackknife_groups": 10}
    assert protocol["sampling_seeds"] == [1, 2] and protocol["training_seeds"] == [0]
    assert protocol["reference"]["n"] == 1000 and protocol["code_commit"] == "abc"
    assert "simultaneous 95 %" in protocol["verdict_families"]["summary"]
    assert "false discovery rate 5 %" in protocol["verdict_families"]["comparisons"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert protocol["family_levels"]["summary"]["comparisons"] == 8  # every distinct model point; no target
    assert "hold jointly at 95 % over their 8 comparisons" in summary
    assert "One training seed (0): these verdicts do not include the variance of retraining." in summary
    write_report(folders, tmp_path / "three", INFO, training_seeds=[0, 1, 2])
    assert "do not include the variance of retraining" not in (tmp_path / "three" / "summary.md").read_text()


def test_protocol_differences_name_what_differs_but_not_the_code():
    from pipeline.report.protocol import differences
    a = {"sampling_seeds": [1, 2, 3], "grid": "fair", "code_commit": "abc"}
    assert differences(a, {**a, "code_commit": "def", "family_levels": {"summary": {"critical_value": 2.9}}}) == {}
    assert differences(a, {**a, "sampling_seeds": [4, 5, 6]}) == {"sampling_seeds": ([1, 2, 3], [4, 5, 6])}
