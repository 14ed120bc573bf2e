"""Bad input to a stage ends it with one line naming the file and the stage that makes it,
exit status 1 and no traceback (which --debug brings back), before Ray starts."""
import subprocess
import sys

import pytest

from pipeline.checkpoint import save_checkpoint
from pipeline.settings import DiffusionTeacherParams, UNetParams
from pipeline.teachers import DataShape, DiffusionTeacherTask, teacher_config
from tests.conftest import ROOT


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
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_file_and_its_stage(case, tmp_path, diffusion_checkpoint):
    args, expected = CASES[case]
    args = [a.format(tmp=tmp_path, ckpt=diffusion_checkpoint) for a in args]
    out = run_stage(args, tmp_path)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Ray" not in out.stdout + out.stderr  # failed before Ray started
    assert not any(p.name in ("t.pt", "s.pt", "e", "r") for p in tmp_path.iterdir())  # nothing written


def test_debug_shows_the_traceback(tmp_path):
    args = ["teacher.py", "diffusion", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "t.pt")]
    assert "Traceback" in run_stage([*args, "--debug"], tmp_path).stderr
