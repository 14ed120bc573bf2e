"""The CIFAR-10 class-conditional profile (profiles/cifar10-class.yaml) through the whole chain
on the CPU, shrunk: the profile's settings (class labels, attention at 16x16, Inception FID,
streamed shards, bf16 autocast, its evaluation, and the students that the smoke chain does not
run through their stages, mm, pd, dmd2 and scm) with tiny nets, a few steps and synthetic 32x32 RGB
images of ten classes in a folder."""
import math
import os
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, keep_students
from tests.integration.conftest import copy_code, loaded_modules_outside_deps, sh

pytestmark = [pytest.mark.scale, pytest.mark.slow]

CLASSES, PER_CLASS, SIZE = 10, 36, 32
PROFILE_METHODS = ("mm", "pd", "dmd2", "scm")


def write_synthetic_classes(root, seed=0):
    """Ten classes of 32x32 RGB PNGs, one sub-folder each: class k is a square of its own colour
    at its own place on a noisy background."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k in range(CLASSES):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True)
        colour = np.array([(k * 53) % 256, (k * 101 + 40) % 256, (255 - k * 23) % 256])
        r, c = 2 + 6 * (k % 4), 2 + 9 * (k // 4)
        for i in range(PER_CLASS):
            image = rng.integers(0, 60, (SIZE, SIZE, 3))
            image[r:r + 10, c:c + 10] = np.clip(colour + rng.integers(-20, 20, 3), 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.png")


def shrunk(profile):
    """The profile with the CPU's sizes: tiny nets, a few steps, a small evaluation."""
    params = yaml.safe_load(profile.read_text())
    params["data"].update(source={"kind": "folder", "path": "data/synthetic", "image_size": SIZE, "channels": 3},
                          n_test=24, n_reference=60, shard_size=64)
    params["ray"].update(num_workers=1, use_gpu=False, threads_per_worker=2, buffer_shards=2)  # bf16 kept
    params["features"]["train"].update(steps=60, log_every=20, checkpoint_every=60)
    params["features"]["classifier"].update(channels=[16, 32], feature_dim=32)
    teacher = params["teacher"]["diffusion"]
    teacher["net"].update(patch=2, channels=[16, 16], blocks_per_level=1, emb_dim=32, dropout=0.0)
    assert teacher["net"]["attention"] == [16]  # the 16x16 level of the shrunk net: attention is kept
    teacher["train"].update(steps=30, batch_size=32, warmup_steps=5, log_every=10, checkpoint_every=30)
    params["teacher"]["bridge"]["net"].update(patch=2)
    # The students the smoke chain does not run through their stages (tests/conftest.py,
    # SMOKE_METHODS); every method's class-conditional student: tests/unit/test_class_conditional.py.
    keep_students(params, PROFILE_METHODS)
    for method in params["distill"]["methods"]:
        params["distill"][method]["train"].update(steps=4, batch_size=16, log_every=2, checkpoint_every=4)
    params["distill"]["pd"].update(start_steps=16, rounds=2)
    # The Inception extractor costs ~0.5 s of CPU per image here: few points, few samples.
    params["distill"]["mm"]["nfe"] = [4]
    params["distill"]["dmd2"].update(nfe=[1, 2], fake_updates=2)  # 2: still the alternating loop
    params["evaluate"].update(nfe=[1, 2], n_samples=12, batch_size=12, seeds=[1, 2], groups=4, grid_samples=4)
    params["evaluate"]["samplers"]["diffusion"] = ["ddim", "heun"]
    params["evaluate"]["device"] = "cpu"
    return params


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_address):
    root = tmp_path_factory.mktemp("profile-chain")
    copy_code(root)
    write_synthetic_classes(root / "data" / "synthetic")
    params = shrunk(ROOT / "profiles" / "cifar10-class.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # its own store: mlflow.db
    env.update({"RAY_ADDRESS": ray_address, "PIPELINE_RUN_GROUP": "profile-chain",
                "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t",
                "PIPELINE_IMPORTS_LOG": str(tmp_path_factory.mktemp("profile-imports") / "imports.jsonl")})
    sh("git init -q && git add -A && git commit -qm profile", root, env)
    tick = time.perf_counter()
    sh("dvc repro", root, env)
    print(f"shrunk cifar10-class dvc repro: {time.perf_counter() - tick:.1f} s")
    return root, env, params


def test_the_chain_completes_and_is_up_to_date(chain):
    root, env, _ = chain
    assert "up to date" in sh("dvc status", root, env).stdout
    summary = (root / "results" / "summary.md").read_text()
    assert "Inception FID" in summary


def test_every_module_a_stage_loaded_is_one_of_its_deps(chain):
    """As tests/integration/test_pipeline.py checks the smoke chain's stages: here the
    class-conditional path, Inception FID and the students of mm, pd, dmd2 and scm."""
    root, env, _ = chain
    logged = loaded_modules_outside_deps(root, env["PIPELINE_IMPORTS_LOG"])
    for m in PROFILE_METHODS:
        assert any(f"pipeline/distill/{m}.py" in e["modules"] for e in logged if e["stage"] == f"distill@{m}"), m


def test_the_models_take_the_label_and_attend_at_16x16(chain):
    root, _, params = chain
    from pipeline.models.loading import load_student, load_teacher
    teacher = load_teacher(root / "models" / "diffusion.pt")
    assert teacher.shape.classes == CLASSES and not teacher.shape.conditional
    assert sorted(teacher.denoiser.net.attn) == ["down0", "up1"]  # the 16x16 level of 32x32 at patch 2
    for method in params["distill"]["methods"]:
        student = load_student(root / "models" / f"{method}.pt")
        assert student.method.teacher.shape.classes == CLASSES
        assert any(isinstance(m, __import__("torch").nn.Embedding) for m in student.net.modules())


def test_every_point_reports_accuracy_against_the_requested_labels(chain):
    root, _, params = chain
    for model in params["evaluate"]["models"]:
        metrics = pd.read_csv(root / "results" / "eval" / model / "metrics.csv")
        assert len(metrics) and metrics["accuracy"].between(0, 1).all(), model
        assert metrics["psnr"].isna().all(), model  # no paired truth in class-conditional generation
        assert (metrics["accuracy_lo"] <= metrics["accuracy"]).all()
    floor = pd.read_csv(root / "results" / "eval" / "floor" / "metrics.csv")
    assert list(floor["model"]) == ["oracle"]  # no corrupted input to score
    oracle = floor.iloc[0]
    assert oracle["accuracy"] > 0.5 and math.isfinite(oracle["fid"])
