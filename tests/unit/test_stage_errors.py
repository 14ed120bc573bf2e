"""Bad input to a stage ends it with one line naming the file and the stage that makes it,
exit status 1 and no traceback (which --debug brings back), before Ray starts."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.models.checkpoint import save_checkpoint
from pipeline.config.settings import DiffusionTeacherParams, UNetParams
from pipeline.models.teachers import DataShape, DiffusionTeacherTask, teacher_config
from tests.conftest import ROOT
from tests.mlflow_server import free_port

pytestmark = pytest.mark.faults  # every user error, one line


def run_stage(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "stages" / args[0]), *args[1:], "--params",
                           str(ROOT / "params.yaml")], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def diffusion_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "diffusion.pt"
    params, shape = DiffusionTeacherParams(net=UNetParams(channels=(8,), emb_dim=16)), DataShape(1, 8, True)
    denoiser = DiffusionTeacherTask(params, shape).build()["denoiser"]
    save_checkpoint(path, "teacher_diffusion", teacher_config("diffusion", params, shape),
                    {"denoiser": denoiser.state_dict()})
    return path


CASES = {
    "missing manifest": (["teacher.py", "diffusion", "--data", "{tmp}/nodata", "--out", "{tmp}/t.pt"],
                         ["nodata/manifest.json is missing", "prepare"]),
    "missing teacher checkpoint": (["distill.py", "ibmd", "--teacher", "{tmp}/bridge.pt", "--data", "{tmp}/d",
                                    "--out", "{tmp}/s.pt"], ["bridge.pt does not exist", "teacher@bridge"]),
    "wrong-kind teacher": (["distill.py", "ibmd", "--teacher", "{ckpt}", "--data", "{tmp}/d", "--out", "{tmp}/s.pt"],
                           ["kind 'teacher_diffusion'", "teacher@bridge"]),
    "missing student": (["evaluate.py", "mm", "--model", "{tmp}/mm.pt", "--data", "{tmp}/d", "--features",
                         "{tmp}/f", "--out", "{tmp}/e"], ["mm.pt does not exist", "distill@mm"]),
    "missing features": (["evaluate.py", "diffusion", "--model", "{ckpt}", "--data", "{tmp}/d", "--features",
                          "{tmp}/nofeatures", "--out", "{tmp}/e"], ["nofeatures/info.json is missing", "features"]),
    "report without features": (["report.py", "--evals", "{tmp}/e", "--features", "{tmp}/nofeatures", "--out",
                                 "{tmp}/r"], ["nofeatures/info.json is missing", "features"]),
    "truncated teacher checkpoint": (["distill.py", "mm", "--teacher", "{tmp}/truncated.pt", "--data", "{tmp}/d",
                                      "--out", "{tmp}/s.pt"], ["truncated.pt is not a torch checkpoint",
                                                               "teacher@diffusion"]),
    "pickled-object checkpoint": (["distill.py", "mm", "--teacher", "{tmp}/pickled.pt", "--data", "{tmp}/d",
                                   "--out", "{tmp}/s.pt"], ["pickled.pt holds pickled Python objects",
                                                            "weights_only", "teacher@diffusion"]),
}


class Arbitrary:
    """An object a checkpoint must not carry (weights_only refuses to unpickle it)."""


def bad_files(tmp, ckpt):
    data = ckpt.read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"format_version": 1, "kind": "teacher_diffusion", "payload": Arbitrary()}, tmp / "pickled.pt")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_file_and_its_stage(case, tmp_path, diffusion_checkpoint):
    args, expected = CASES[case]
    args = [a.format(tmp=tmp_path, ckpt=diffusion_checkpoint) for a in args]
    bad_files(tmp_path, diffusion_checkpoint)
    out = run_stage(args, tmp_path)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Ray" not in out.stdout + out.stderr  # failed before Ray started
    assert not any(p.name in ("t.pt", "s.pt", "e", "r") for p in tmp_path.iterdir())  # nothing written


def test_a_bad_params_value_is_one_line_naming_the_file_and_the_key(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["teacher"]["diffusion"]["train"]["lr"] = -1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "teacher.py"), "diffusion", "--data",
                          str(tmp_path / "d"), "--out", str(tmp_path / "t.pt"), "--params", str(bad)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"{bad}: teacher.diffusion.train.lr: Input should be greater than 0 (got -1)" in out.stderr
    assert not (tmp_path / "t.pt").exists()


def test_debug_shows_the_traceback(tmp_path):
    args = ["teacher.py", "diffusion", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "t.pt")]
    assert "Traceback" in run_stage([*args, "--debug"], tmp_path).stderr


def write_png(path, size=8):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), 128).save(path)


def folders(tmp):
    """Image folders a user can get wrong, and the source params that point at them."""
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("no images here")
    write_png(tmp / "mixed" / "loose.png")
    write_png(tmp / "mixed" / "cats" / "1.png")
    for name in ("1", "2"):
        write_png(tmp / "edges" / f"{name}.png")
    write_png(tmp / "photos" / "1.png")
    write_png(tmp / "photos" / "3.png")
    return {
        "missing folder": {"kind": "folder", "path": str(tmp / "nowhere")},
        "no images": {"kind": "folder", "path": str(tmp / "notes")},
        "loose images beside class folders": {"kind": "folder", "path": str(tmp / "mixed")},
        "paired names that do not match": {"kind": "paired", "a": str(tmp / "photos"), "b": str(tmp / "edges")},
        "CIFAR-10 not on disk": {"kind": "cifar10", "root": str(tmp / "cifar")},
    }


DATA_CASES = {
    "missing folder": "nowhere does not exist",
    "no images": "notes contains no images",
    "loose images beside class folders": "mixes class sub-folders with loose images",
    "paired names that do not match": "have no match in",
    "CIFAR-10 not on disk": "cifar-10-batches-py does not exist",
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_source_is_one_line_before_ray_starts(case, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    source = folders(tmp_path)[case]
    if source["kind"] in ("folder", "paired"):
        source.update(image_size=8, channels=1)
    params["data"]["source"] = source
    if source["kind"] == "paired":
        params["corruption"] = {"kind": "paired"}  # y comes from the folder b
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py"), "--out", str(tmp_path / "prepared"),
                          "--params", str(file)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("prepare: ") and DATA_CASES[case] in lines[0], lines[0]
    assert "Ray" not in out.stdout + out.stderr and not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("stage", [["teacher.py", "diffusion", "--data", "{tmp}/d", "--out", "{tmp}/t.pt"],
                                   ["evaluate.py", "mm", "--model", "{tmp}/mm.pt", "--data", "{tmp}/d",
                                    "--features", "{tmp}/f", "--out", "{tmp}/e"]])
def test_a_tracking_server_that_is_down_is_one_line_before_ray_starts(stage, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [a.format(tmp=tmp_path) for a in stage]
    out = subprocess.run([sys.executable, str(ROOT / "stages" / args[0]), *args[1:], "--params",
                          str(ROOT / "params.yaml")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"MLflow tracking server {uri} is not reachable" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0]
    assert "Ray" not in out.stdout + out.stderr and not list(tmp_path.iterdir())  # nothing started or written


def failed_in_one_line(out, prefix, *expected):
    """Exit status 1 and one stderr line, starting `prefix` and holding each expected text."""
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(prefix), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Ray" not in out.stdout + out.stderr  # failed before Ray started
    return lines[0]


def set_key(path, value):
    def edit(params):
        *parents, last = path.split(".")
        section = params
        for key in parents:
            section = section[key]
        section[last] = value
    return edit


PARAMS_CASES = {  # an edit of params.yaml, and what the line says
    "unknown key": (set_key("teacher.diffusion.train.learning_rate", 1e-3),
                    ["teacher.diffusion.train.learning_rate", "Extra inputs are not permitted"]),
    "wrong type": (set_key("teacher.diffusion.train.steps", "many"),
                   ["teacher.diffusion.train.steps", "valid integer", "(got 'many')"]),
    "out of range": (set_key("teacher.diffusion.train.lr", -1),
                     ["teacher.diffusion.train.lr", "greater than 0", "(got -1)"]),
}


@pytest.mark.parametrize("case", PARAMS_CASES)
def test_a_bad_params_key_type_or_range_is_one_line(case, tmp_path):
    edit, expected = PARAMS_CASES[case]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "teacher.py"), "diffusion", "--data",
                          str(tmp_path / "d"), "--out", str(tmp_path / "t.pt"), "--params", str(bad)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    failed_in_one_line(out, "invalid params: ", str(bad), *expected)
    assert not (tmp_path / "t.pt").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared data set (8x8 digits, 2x super-resolution), made in this process."""
    from pipeline.data.prepare import prepare_dataset
    from pipeline.config.settings import DigitsSource, SuperResolution
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_dataset(DigitsSource(), SuperResolution(factor=2), 100, 400, 0, out, n_reference=200)
    return out


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


SHARD_CASES = {  # what happens to train-00001.pt, and what the line says
    "missing shard": (lambda p: p.unlink(), "listed in the manifest is missing"),
    "truncated shard": (truncate, "does not match its checksum (truncated or edited)"),
    "edited shard": (edit_last_byte, "does not match its checksum (truncated or edited)"),
}


@pytest.mark.parametrize("case", SHARD_CASES)
def test_a_bad_shard_is_one_line_and_the_earlier_output_is_kept(case, tmp_path, prepared):
    break_it, expected = SHARD_CASES[case]
    data = tmp_path / "prepared"
    shutil.copytree(prepared, data)
    break_it(data / "train-00001.pt")
    earlier = tmp_path / "t.pt"
    earlier.write_bytes(b"the checkpoint of an earlier run")
    out = run_stage(["teacher.py", "diffusion", "--data", str(data), "--out", str(earlier)], tmp_path)
    failed_in_one_line(out, "teacher: ", str(data / "train-00001.pt"), expected, "dvc repro -f prepare")
    assert earlier.read_bytes() == b"the checkpoint of an earlier run"  # nothing produced is lost


def bad_images(tmp):
    write_png(tmp / "small" / "big.png", size=12)
    write_png(tmp / "small" / "tiny.png", size=4)
    write_png(tmp / "fake" / "1.png")
    (tmp / "fake" / "2.png").write_text("a text file named like an image")
    (tmp / "fake" / "notes.txt").write_text("files without an image suffix are ignored")
    return {
        "an image smaller than image_size": ({"kind": "folder", "path": str(tmp / "small")},
                                             ["tiny.png is 4x4, smaller than data.source.image_size 8"]),
        "a non-image file named .png": ({"kind": "folder", "path": str(tmp / "fake")},
                                        ["2.png is not a readable image"]),
    }


@pytest.mark.parametrize("case", ["an image smaller than image_size", "a non-image file named .png"])
def test_a_bad_image_file_is_one_line_before_ray_starts(case, tmp_path):
    source, expected = bad_images(tmp_path)[case]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = {**source, "image_size": 8, "channels": 1}
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py"), "--out", str(tmp_path / "prepared"),
                          "--params", str(file)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    failed_in_one_line(out, "prepare: ", *expected)
    assert not (tmp_path / "prepared").exists()


SWEEP_CASES = {  # a space of the tiny sweep, and what the line says
    "a key that is not in params": ({"distill.cd.train.lrr": {"grid": [1e-4]}}, ["distill.cd.train.lrr"]),
    "a value out of range": ({"distill.cd.ema_mu": {"grid": [0.9, 1.5]}}, ["distill.cd.ema_mu=1.5"]),
}


@pytest.mark.parametrize("case", SWEEP_CASES)
def test_a_bad_sweep_file_is_one_line_naming_the_file_and_key(case, tmp_path):
    space, expected = SWEEP_CASES[case]
    spec = yaml.safe_load((ROOT / "sweeps" / "tiny_cd_lr.yaml").read_text())
    spec["space"] = space
    file = tmp_path / "bad_sweep.yaml"
    file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_stage(["sweep.py", str(file), "--out", str(tmp_path / "out")], tmp_path)
    failed_in_one_line(out, "sweep: ", str(file), *expected)
    assert not (tmp_path / "out").exists()


def test_evaluate_on_cuda_without_a_gpu_is_one_line_before_anything_loads(tmp_path, diffusion_checkpoint):
    """evaluate.device: cuda on a machine without CUDA and without RAY_ADDRESS."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: evaluate.device: cuda is valid here")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["device"] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "diffusion", "--model",
                          str(diffusion_checkpoint), "--data", str(tmp_path / "d"), "--features",
                          str(tmp_path / "nofeatures"), "--out", str(tmp_path / "e"), "--params",
                          str(tmp_path / "params.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    failed_in_one_line(out, "evaluate: evaluate.device is cuda but there is no GPU to sample on",
                       "none on this machine, no RAY_ADDRESS", "set evaluate.device: cpu")
    assert not (tmp_path / "e").exists()
