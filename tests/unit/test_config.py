"""params.yaml validation: the shipped file is valid, and each kind of mistake is
reported with the key that is wrong, fast and before anything heavy is imported."""
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.config.schema import ConfigError, load_params, parse_params
from pipeline.config.settings import BRIDGE_SAMPLER_NAMES, DIFFUSION_SAMPLER_NAMES, TEACHER_NAMES
from tests.conftest import ROOT, smoke_params


def shipped():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_and_smoke_profile_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.corruption.kind == "super_resolution" and params.corruption.factor == 4
    assert params.data.source.kind == "mnist5k"
    assert 1 in params.evaluate.nfe and 32 in params.evaluate.nfe and len(params.evaluate.seeds) >= 3
    parse_params(smoke_params())


def test_names_in_settings_match_the_registries():
    from pipeline.samplers import BRIDGE_SAMPLERS, DIFFUSION_SAMPLERS
    from pipeline.models.teachers import TEACHERS
    assert set(DIFFUSION_SAMPLER_NAMES) == set(DIFFUSION_SAMPLERS)
    assert set(BRIDGE_SAMPLER_NAMES) == set(BRIDGE_SAMPLERS)
    assert set(TEACHER_NAMES) == set(TEACHERS)
    from pipeline.distill import METHODS
    # The schema's distill blocks are the registry's params models, and each implementation
    # lives at pipeline/distill/<name>.py (the code dependency dvc.yaml lists for its stage).
    settings_blocks = {name: type(getattr(load_params(ROOT / "params.yaml").distill, name)) for name in METHODS}
    assert settings_blocks == {name: m.params for name, m in METHODS.items()}
    for name, entry in METHODS.items():
        assert entry.teacher in TEACHER_NAMES
        assert entry.implementation.startswith(f"pipeline.distill.{name}:")
        assert (ROOT / "pipeline" / "distill" / f"{name}.py").is_file()


@pytest.mark.parametrize("path, value, message", [
    (("teacher", "diffusion", "train", "lr"), -1.0, "teacher.diffusion.train.lr"),
    (("teacher", "bridge", "train", "stepz"), 3, "teacher.bridge.train.stepz"),
    (("teacher", "bridge", "style"), "ddim", "teacher.bridge.style"),
    (("features", "train", "batch_size"), "big", "features.train.batch_size"),
    (("corruption", "kind"), "rain", "corruption"),
    (("corruption", "factor"), 1, "corruption.super_resolution.factor"),
    (("evaluate", "nfe"), [4, 2], "evaluate.nfe"),
    (("evaluate", "samplers", "diffusion"), ["ddim", "magic"], "evaluate.samplers.diffusion"),
    (("evaluate", "max_nfe", "bridge"), {"dpmpp_2m": 8}, "evaluate.max_nfe.bridge"),
    (("evaluate", "models"), ["diffusion", "gan"], "evaluate.models"),
    (("ray", "num_workers"), 0, "ray.num_workers"),
    (("distill", "methods", "gan"), "diffusion", "distill.methods"),
    (("distill", "methods", "ibmd"), "diffusion", "ibmd distils 'bridge'"),
    (("distill", "mm", "nfe"), [8, 4], "distill.mm.nfe"),
    (("distill", "ibmd", "aux_updates"), 0, "distill.ibmd.aux_updates"),
    (("distill", "pd", "rounds"), 7, "cannot be halved 7 times"),
    (("distill", "tdd", "schedule"), [10, 500], "distill.tdd"),
    (("distill", "cd", "solver"), "rk4", "distill.cd.solver"),
])
def test_bad_value_names_its_key(path, value, message):
    raw = shipped()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_params(raw)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["corruption"].update(factor=3), "factor=3 must divide the image size 28x28"),
    (lambda r: r["evaluate"].update(n_samples=5000), "exceeds data.n_test"),
    (lambda r: r.update(corruption={"kind": "none"}), "bridge nothing to start from"),
    (lambda r: r.update(corruption={"kind": "paired"}), "'paired' goes with 'paired'"),
    (lambda r: r["evaluate"].update(models=["diffusion", "bridge"]), "lacks the distilled student"),
    (lambda r: r["distill"]["methods"].pop("pd"), r"lists \['pd'\], which distill.methods does not train"),
    (lambda r: (r["evaluate"].update(models=["diffusion", "mm"]), r["distill"].update(methods={"mm": "diffusion"}),
                r.update(corruption={"kind": "none"})) and None, None),
    (lambda r: (r["evaluate"].update(models=["diffusion", "mm"]), r["distill"].update(methods={"mm": "diffusion"}),
                r.update(corruption={"kind": "none", "labels": True})) and None, None),
    (lambda r: r["teacher"]["diffusion"]["net"].update(attention=[16]),
     r"teacher.diffusion.net.attention \[16\]: each must be a feature-map side of this net, \[14, 7\]"),
    (lambda r: r.update(corruption={"kind": "super_resolution", "factor": 4, "labels": True}), "labels"),
    (lambda r: r["teacher"]["bridge"].update(style="i2sb"), r"cdbm distils a bridge of style \('ddbm',\), but teacher.bridge.style is 'i2sb'"),
    (lambda r: (r["teacher"]["bridge"].update(style="i2sb"), r["distill"]["methods"].pop("cdbm"),
                r["evaluate"]["models"].remove("cdbm")) and None, None),
    (lambda r: (r["evaluate"].update(models=["diffusion"]), r["distill"].update(methods={}),
                r["teacher"]["diffusion"].update(pretrained={"path": "pretrained/diffusion"}),
                r.update(corruption={"kind": "none", "labels": True})), "set corruption.labels: false"),
])
def test_inconsistent_sections_are_explained(change, message):
    raw = shipped()
    change(raw)
    if message is None:  # a consistent variation: must be accepted
        parse_params(raw)
        return
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_stage_rejects_bad_params_fast_and_before_heavy_imports(tmp_path):
    raw = shipped()
    raw["teacher"]["bridge"]["train"]["lr"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    tick = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "stages" / "teacher.py"),
                          "bridge", "--data", "d", "--out", "o", "--params", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True, cwd=tmp_path)
    elapsed = time.perf_counter() - tick
    assert out.returncode != 0
    assert "teacher.bridge.train.lr" in out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "import time:" in line}
    assert not {"torch", "ray", "mlflow"} & imported
    print(f"rejected in {elapsed:.2f} s")


def test_dry_run_prints_resolved_section(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "teacher.py"), "diffusion", "--data", "d",
                          "--out", "o", "--dry-run", "--params", str(ROOT / "params.yaml")],
                         capture_output=True, text=True, check=True)
    printed = yaml.safe_load(out.stdout)
    assert printed["teacher.diffusion"]["schedule"]["sigma_max"] == 80.0
    assert printed["teacher.diffusion"]["train"]["adam_betas"] == [0.9, 0.999]  # defaults resolved
