"""The whole chain on the smoke profile via `dvc repro`, in a temporary copy of the
project: outputs, MLflow records, a no-op second run, precise invalidation, and bad
input rejected without touching what earlier stages produced."""
import json
import shutil
import time

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.data.shards import sha256
from pipeline.evaluation.results import COLUMNS

from tests.conftest import smoke_params
from tests.integration.conftest import loaded_modules_outside_deps, sh

pytestmark = pytest.mark.slow


def test_chain_writes_the_report(project):
    root, _ = project
    table = pd.read_csv(root / "results" / "fid_vs_nfe.csv")
    assert tuple(table.columns) == COLUMNS
    params = smoke_params()
    expected = {("diffusion", s) for s in params["evaluate"]["samplers"]["diffusion"]}
    expected |= {("bridge", s) for s in params["evaluate"]["samplers"]["bridge"]}
    expected |= {(m, "student") for m in params["distill"]["methods"]}
    expected |= {("oracle", "x0"), ("input", "y")}  # the floor, scored like models
    assert set(zip(table["model"], table["sampler"])) == expected
    # Every point has its interval, and it contains the estimate.
    for m in ("fid", "kid", "precision", "recall", "psnr", "ssim", "accuracy"):
        assert (table[f"{m}_lo"] <= table[m]).all() and (table[m] <= table[f"{m}_hi"]).all(), m
    oracle = table[table["model"] == "oracle"].iloc[0]
    assert oracle["fid"] < table[table["model"] == "diffusion"]["fid"].min()  # the floor is below the models
    verdicts = pd.read_csv(root / "results" / "comparisons.csv")
    assert set(verdicts["verdict"]) <= {"better", "worse", "indistinguishable"}
    assert {"vs teacher's best", "floor vs teacher's best", "vs teacher at the same NFE",
            "method vs method at the same NFE", "method vs method at the same NFE, other teacher"
            } == set(verdicts["comparison"])
    across = verdicts[verdicts["comparison"] == "method vs method at the same NFE, other teacher"]
    assert {("cd/student@1", "ibmd/student@1"), ("cd/student@2", "cdbm/student@2")} <= set(zip(across["a"], across["b"]))
    lower = verdicts["metric"] == "fid"  # precision and recall: higher is better
    assert ((verdicts["verdict"] == "better") == ((verdicts["hi"] < 0) & lower | (verdicts["lo"] > 0) & ~lower)).all()
    assert set(verdicts["metric"]) == {"fid", "precision", "recall"} and verdicts[["p", "q"]].notna().all().all()
    assert (verdicts["q"] >= verdicts["p"]).all()  # Benjamini-Hochberg only raises a p-value
    # One-call samplers reach the same 1-NFE sample: compared once, named together.
    assert verdicts["a"].str.startswith("diffusion/{").any() and not verdicts["a"].str.match(r"diffusion/\w+@1$").any()
    summary = (root / "results" / "summary.md").read_text()
    assert summary.startswith("# How few network evaluations does each model need?")
    assert "nan" not in summary and "Where zero is" in summary
    assert [line for line in summary.splitlines() if line.startswith("## ")][0] == "## The answer"
    answer = [line for line in summary.split("## The answer")[1].split("\n## ")[0].splitlines()
              if line.startswith("| ") and not line.startswith("| model ")]
    named = [line.split(" | ")[0][2:].split(" ")[0] for line in answer]
    assert sorted(named) == sorted(params["evaluate"]["models"])  # one row per model
    assert set(named[:2]) == {"diffusion", "bridge"}  # the teachers first
    assert all(all(cell.strip() for cell in line.strip("|").split("|")) for line in answer)  # no empty cell
    across_section = summary.split("## Across teacher families, at the same NFE")[1].split("\n## ")[0]
    assert across_section.count("\n| ") == 1 + len(across)  # header + every cross-family comparison
    targets = summary.split("## Targets")[1].split("\n## ")[0]
    assert targets.count("\n| ") == 1 + len(params["report"]["targets"])  # header + one row each
    assert "mm @ 8 NFE" in targets and "not evaluated" in targets  # mm is not in the smoke chain
    drawn = pd.read_csv(root / "results" / "verdicts.csv")
    stated = verdicts[verdicts["comparison"].isin(["vs teacher's best", "floor vs teacher's best"])]
    merged = drawn[drawn["verdict"] != "the teacher's best"].merge(stated, left_on="point", right_on="a")
    merged = merged[merged["b"].str.split("/").str[0] == merged["family"]]
    assert len(merged) == (drawn["verdict"] != "the teacher's best").sum()  # each drawn point is a stated one
    assert (merged["difference_x"] == merged["difference_y"]).all()  # at the summary's level, not the list's
    protocol = json.loads((root / "results" / "protocol.json").read_text())
    assert protocol["sampling_seeds"] == params["evaluate"]["seeds"] and protocol["training_seeds"] == [params["seed"]]
    assert protocol["evaluated_inputs"]["n"] == params["evaluate"]["n_samples"] and protocol["code_commit"]
    assert "these verdicts do not include the variance of retraining" in summary
    headline = json.loads((root / "results" / "headline.json").read_text())
    assert set(headline) == set(params["evaluate"]["models"])
    assert all(set(h) == {"fewest_nfe", "fid", "teacher_best_fid", "speedup"} for h in headline.values())
    students = table[table["sampler"] == "student"]
    assert set(students["method"]) == set(params["distill"]["methods"])
    assert dict(zip(students["model"], students["teacher"])) == params["distill"]["methods"]
    floor = table["model"].isin(["oracle", "input"])
    assert table["fid"].notna().all() and (table[~floor]["sec_per_sample"] > 0).all()
    assert (table[floor]["sec_per_sample"] == 0).all()  # the floor rows are not sampled
    teachers = table[table["method"] == "teacher"]
    assert (teachers["nfe"] <= max(params["evaluate"]["nfe"])).all()
    for name in ("fid_vs_nfe.png", "verdicts.png", "summary.md", "comparisons.md", "fid_vs_nfe_curves.csv"):
        assert (root / "results" / name).stat().st_size > 0
    assert "## Pareto front" in (root / "results" / "comparisons.md").read_text()
    replicates = json.loads((root / "results" / "eval" / "diffusion" / "replicates.json").read_text())
    assert replicates["n"] == params["evaluate"]["n_samples"] and replicates["seeds"] == params["evaluate"]["seeds"]
    assert all(len(r["fid"]) == params["evaluate"]["groups"] for r in replicates["points"].values())
    for model in params["evaluate"]["models"]:
        grids = sorted((root / "results" / "eval" / model / "grids").glob("nfe_*.png"))
        assert grids, model


def test_mlflow_has_tagged_runs_and_fid_curves(project):
    root, env = project
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # the chain ran against a real server
    assert not (root / "mlflow.db").exists()
    exp = client.get_experiment_by_name("distillation")
    runs = client.search_runs([exp.experiment_id], "tags.group = 'smoke'")
    stages = {r.data.tags["stage"] for r in runs}
    assert {"pipeline", "prepare", "features", "teacher", "distill", "evaluate", "floor", "report"} <= stages
    for r in runs:
        if r.data.tags["stage"] != "pipeline":
            assert r.data.tags["git_commit"] != "unknown" and len(r.data.tags["params_hash"]) == 12
    curve = [r for r in runs if r.info.run_name == "diffusion/heun"][0]
    history = client.get_metric_history(curve.info.run_id, "fid")
    assert sorted(m.step for m in history) == [1, 3]  # Heun: 2N-1 NFE, so 2 and 4 map to 1 and 3
    lo, hi = (client.get_metric_history(curve.info.run_id, k) for k in ("fid_lo", "fid_hi"))
    assert all(a.value <= f.value <= b.value for a, f, b in zip(lo, history, hi))
    teacher = [r for r in runs if r.data.tags["stage"] == "teacher"][0]
    assert client.get_metric_history(teacher.info.run_id, "train/loss")
    # Students log like teachers: same metric names, step = nfe, tags method/teacher/nfe,
    # so selecting runs in the UI overlays their FID curves.
    nfe = smoke_params()["distill"]["tdd"]["nfe"]
    tdd = [r for r in runs if r.info.run_name == "tdd/student"][0]
    assert (tdd.data.tags["method"], tdd.data.tags["teacher"]) == ("tdd", "diffusion")
    assert tdd.data.tags["nfe"] == ",".join(map(str, nfe)) and len(nfe) > 1
    assert sorted(m.step for m in client.get_metric_history(tdd.info.run_id, "fid")) == nfe
    distilled = [r for r in runs if r.data.tags["stage"] == "distill" and r.data.tags["model"] == "ibmd"][0]
    assert distilled.data.tags["teacher"] == "bridge"
    assert client.get_metric_history(distilled.info.run_id, "train/loss")


def test_every_module_a_stage_loaded_is_one_of_its_deps(project):
    """The dynamic half of tests/unit/test_dvc_yaml.py: every library module a stage process of
    the smoke chain really loaded (lazy imports included) lies under one of its dvc.yaml deps,
    so no edit of a module can leave that stage's output stale (the profile chain checks its
    own stages, MM's and PD's among them, the same way)."""
    root, env = project
    logged = loaded_modules_outside_deps(root, env["PIPELINE_IMPORTS_LOG"])
    assert any("pipeline/models/teachers.py" in e["modules"] for e in logged if e["stage"] == "teacher@bridge")


def test_second_repro_runs_nothing(project):
    root, env = project
    tick = time.perf_counter()
    out = sh("dvc repro", root, env)
    elapsed = time.perf_counter() - tick
    assert "Running stage" not in out.stdout
    print(f"no-op dvc repro: {elapsed:.2f} s")


def test_truncated_shard_is_named_and_earlier_outputs_survive(project):
    root, env = project
    shard = sorted((root / "data" / "prepared").glob("train-*.pt"))[0]
    model = root / "models" / "diffusion.pt"
    before = (shard.read_bytes(), model.stat().st_mtime_ns)
    try:
        shard.write_bytes(before[0][: len(before[0]) // 2])
        out = sh(f"python stages/teacher.py diffusion --data data/prepared --out {model}", root, env,
                 check=False)
        assert out.returncode != 0
        assert shard.name in out.stderr
        assert model.stat().st_mtime_ns == before[1]
    finally:
        shard.write_bytes(before[0])


def test_ibmd_never_reads_clean_images(project_copy, tmp_path):
    """Replace every clean training image by noise (checksums re-signed): the IBMD student
    comes out bit-identical, so its stage trains on the corrupted y alone."""
    root, env = project_copy
    data = tmp_path / "scrambled"
    shutil.copytree(root / "data" / "prepared", data)
    manifest = json.loads((data / "manifest.json").read_text())
    g = torch.Generator().manual_seed(0)
    for entry in manifest["splits"]["train"]["shards"]:
        shard = torch.load(data / entry["file"], weights_only=True)
        shard["x0"] = torch.randint(0, 256, shard["x0"].shape, generator=g, dtype=torch.uint8)
        torch.save(shard, data / entry["file"])
        entry["sha256"] = sha256(data / entry["file"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "ibmd.pt"
    sh(f"python stages/distill.py ibmd --teacher models/bridge.pt --data {data} --out {out} "
       f"--storage {tmp_path / 'ray'}", root, env)
    original = torch.load(root / "models" / "ibmd.pt", weights_only=True)["state"]["student"]
    again = torch.load(out, weights_only=True)["state"]["student"]
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_distill_rejects_a_wrong_teacher_before_starting(project, tmp_path):
    root, env = project
    out = tmp_path / "tdd.pt"
    run = sh(f"python stages/distill.py tdd --teacher models/bridge.pt --data data/prepared --out {out}",
             root, env, check=False)
    assert run.returncode != 0 and "teacher_bridge" in run.stderr and "teacher_diffusion" in run.stderr
    assert "Started a local Ray" not in run.stderr and not out.exists()


def test_changing_one_teacher_reruns_only_its_branch(project_copy):
    """It really reruns the changed branch, in a copy of the smoke project (`dvc repro --dry`
    would list only the stages whose own dependencies changed, not what they feed)."""
    root, env = project_copy
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teacher"]["bridge"]["train"]["lr"] = 0.001
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc repro", root, env).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"teacher@bridge", "evaluate@bridge", "distill@ibmd", "evaluate@ibmd", "distill@cdbm", "evaluate@cdbm",
                   "report"}


def test_changing_one_method_reruns_only_that_student(project_copy):
    root, env = project_copy
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["distill"]["tdd"]["train"]["lr"] = 5e-4
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc repro", root, env).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"distill@tdd", "evaluate@tdd", "report"}
