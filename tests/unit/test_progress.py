"""Progress bars: when the stages show them (terminal, not CI), what a training bar shows,
and (slow, on Ray) the driver's bar fed by rank 0 during `fit`, with the training unchanged."""
import functools
import importlib.util
import io

import pytest
import torch

from pipeline.runtime import progress
from pipeline.config.settings import DiffusionTeacherParams, RayParams, TrainParams, UNetParams
from pipeline.models.teachers import DataShape, DiffusionTeacherTask
from pipeline.training.loop import TrainRun
from tests.conftest import ROOT
from tests.helpers import square_images as toy_data


def stage_common():
    spec = importlib.util.spec_from_file_location("stage_common", ROOT / "stages" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("env, shown", [
    ({}, True), ({"CI": "true"}, False), ({"CI": "1"}, False), ({"CI": "0"}, True),
    ({"CI": "false"}, True), ({"CI": ""}, True), ({"PIPELINE_PROGRESS": "0"}, False),
    ({"PIPELINE_PROGRESS": "1"}, True)])
def test_progress_only_on_a_terminal_and_never_under_ci(monkeypatch, env, shown):
    common = stage_common()
    for key in ("CI", "PIPELINE_PROGRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(common.sys, "stderr", Terminal())
    assert common.progress_enabled() is shown
    monkeypatch.setattr(common.sys, "stderr", io.StringIO())  # not a terminal: never
    assert common.progress_enabled() is False


@pytest.mark.parametrize("enabled", [True, False])
def test_training_bar_shows_loss_and_throughput_only_when_enabled(enabled):
    out = io.StringIO()
    with progress.bar(40, "training", enabled, unit="step", file=out) as bar:
        progress.show_training(bar, 20, {"step": 20, "loss": 0.5, "samples_per_sec": 1234.4})
        progress.show_training(bar, 10, {"step": 10, "loss": 0.75, "samples_per_sec": 99.0})  # resumed
        progress.show_training(bar, 40, {"step": 40, "loss": 0.25, "samples_per_sec": 2000.0})
    if not enabled:
        assert out.getvalue() == ""
        return
    final = out.getvalue().split("\r")[-1]
    assert "training" in final and "40/40" in final
    assert "loss=0.25" in final and "samples/s=2000" in final


SHAPE = DataShape(channels=1, image_size=8, conditional=True)
TASK = DiffusionTeacherTask(DiffusionTeacherParams(net=UNetParams(channels=(8,), emb_dim=16)), SHAPE)


@pytest.mark.slow
def test_fit_shows_rank_0_reports_in_the_driver_and_trains_the_same(idle_cluster, tmp_path, monkeypatch):
    from pipeline.training.ray_train import fit
    bars, steps, out = [], [], io.StringIO()
    bar, show_training = progress.bar, progress.show_training

    def recorded_bar(*args, **kwargs):
        bars.append(bar(*args, **kwargs, file=out))
        return bars[-1]

    def recorded_show(bar_, step, metrics):
        steps.append(step)
        show_training(bar_, step, metrics)

    monkeypatch.setattr(progress, "bar", recorded_bar)
    monkeypatch.setattr(progress, "show_training", recorded_show)
    train = TrainParams(steps=12, batch_size=16, lr=3e-3, log_every=4, checkpoint_every=12)
    job = TrainRun(TASK, functools.partial(toy_data, 64), train, 0, RayParams(num_workers=2, threads_per_worker=1))
    run = functools.partial(fit, job, tmp_path / "ray")
    shown = run("shown", progress=True)
    assert len(bars) == 1 and bars[0].n == train.steps
    assert steps == [4, 8, 12]  # each report once: rank 0's, not rank 1's
    final = out.getvalue().split("\r")[-1]
    assert "12/12" in final and "loss=" in final and "samples/s=" in final
    plain = run("plain")
    assert len(bars) == 1  # no bar, no queue without progress
    for name, weights in plain["nets"]["denoiser"].items():
        assert torch.equal(weights, shown["nets"]["denoiser"][name]), name


def square(i):
    return i * i


@pytest.mark.slow
def test_parallel_map_calls_on_done_once_per_job_and_keeps_job_order(idle_cluster):
    from pipeline.runtime.cluster import parallel_map
    finished = []
    assert parallel_map(square, [(i,) for i in range(5)], on_done=finished.append) == [0, 1, 4, 9, 16]
    assert sorted(finished) == list(range(5))
