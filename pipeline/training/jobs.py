"""The training job of each training stage, shared by its DVC stage script and by sweeps.

A `TrainingJob` is what a training stage trains (task, data loader, train
params) plus `write(path, state)`, which turns the final training state into
the stage's checkpoint; `job.run(seed, scaling, ...)` is the `TrainRun` that
`ray_train.fit` runs. `stages/teacher.py`, `stages/distill.py` and
`stages/features.py` run exactly this job, and so does every sweep trial, so
a trial trains what `dvc repro` of that stage would train.

Stage names are DVC's: `features`, `teacher@<name>`, `distill@<method>`.
"""
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from pipeline.config.settings import TEACHER_NAMES, RayParams, TrainParams
from pipeline.data.shards import load_split
from pipeline.data.stream import TrainData
from pipeline.training.loop import Task, TrainRun


@dataclass
class TrainingJob:
    task: Task
    load_data: Callable[[], dict]  # picklable; runs on each Ray worker
    train: TrainParams
    write: Callable[[Path, dict], None]  # (checkpoint path, final training state)
    tags: dict  # model / method / teacher, for MLflow

    def run(self, seed, scaling: RayParams, log=None, hooks=()) -> TrainRun:
        """This job as a `TrainRun` (`log`: rank 0's metric logger; `hooks`: report hooks);
        `scaling.buffer_shards` decides whether the workers stream their data."""
        load = self.load_data
        if isinstance(load, TrainData):
            load = replace(load, buffer_shards=scaling.buffer_shards, seed=seed)
        return TrainRun(self.task, load, self.train, seed, scaling, log, tuple(hooks))


def stage_names(params):
    """Every training stage of the pipeline these params describe."""
    return ["features", *(f"teacher@{n}" for n in TEACHER_NAMES),
            *(f"distill@{m}" for m in params.distill.methods)]


def split_stage(stage):
    """("teacher", "bridge") from "teacher@bridge"; ("features", None) from "features"."""
    kind, _, name = stage.partition("@")
    return kind, name or None


def params_section(stage):
    """The params section of a training stage: features, teacher.<name>, distill.<method>."""
    kind, name = split_stage(stage)
    return f"{kind}.{name}" if name else kind


def features_job(feats, data_dir) -> TrainingJob:
    """The features stage's job for its params section `feats` (FeaturesParams)."""
    from pipeline.features.classifier import ClassifierTask, save_classifier
    train = load_split(data_dir, "train")  # checks every shard's checksum, naming a bad one
    task = ClassifierTask(feats.classifier, train.x0.shape[1], train.num_classes)

    def write(path, state):
        model = task.build()["classifier"]
        model.load_state_dict(state["ema"]["classifier"])
        save_classifier(path, model, feats.classifier, task.in_channels, task.num_classes)

    return TrainingJob(task, TrainData(str(data_dir), "train", ("x0", "label")),
                       feats.train, write, {"model": "classifier"})


def teacher_job(name, teacher, data_dir) -> TrainingJob:
    """teacher@<name>'s job for its params section `teacher`."""
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.models.teachers import TEACHERS, DataShape, teacher_config
    if getattr(teacher, "pretrained", None) is not None:
        raise ValueError(f"teacher.{name}.pretrained is set: teacher@{name} trains nothing "
                         "(stages/teacher.py writes the pretrained checkpoint)")
    train = load_split(data_dir, "train")
    shape = DataShape(channels=train.x0.shape[1], image_size=train.x0.shape[-1],
                      conditional=train.conditional,
                      classes=train.num_classes if train.class_conditional else 0)
    task = TEACHERS[name][1](teacher, shape)

    def write(path, state):
        save_checkpoint(path, f"teacher_{name}", teacher_config(name, teacher, shape),
                        {"denoiser": state["ema"]["denoiser"]})

    keys = ("x0", "y", "label") if shape.classes else ("x0", "y")
    return TrainingJob(task, TrainData(str(data_dir), "train", keys),
                       teacher.train, write, {"model": name, "method": "teacher", "teacher": name})


def distill_job(method_name, method_params, data_dir, teacher_path) -> TrainingJob:
    """distill@<method>'s job for its params block; raises CheckpointError / DataError naming
    the file on a wrong teacher or a bad shard."""
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.distill import make_method, registration
    from pipeline.distill.base import student_config
    from pipeline.models.loading import load_teacher
    method = make_method(method_name, method_params,
                         load_teacher(teacher_path, names=(registration(method_name).teacher,)))
    # Only the fields the method trains on (IBMD: corrupted y alone).
    load_data = TrainData(str(data_dir), "train", method.train_keys)
    load_data()  # checks every shard before any worker starts

    def write(path, state):
        save_checkpoint(path, f"student_{method_name}", student_config(method),
                        {"student": state["ema"]["student"]})

    return TrainingJob(method, load_data, method_params.train, write,
                       {"model": method_name, "method": method_name, "teacher": method.teacher.name})


def training_job(stage, params, data_dir, teacher_path=None) -> TrainingJob:
    """The job of `stage` on the pipeline's data (a student also reads its teacher's
    checkpoint `teacher_path`)."""
    kind, name = split_stage(stage)
    if stage not in stage_names(params):
        raise ValueError(f"unknown training stage {stage!r}; expected one of {stage_names(params)}")
    if kind == "features":
        return features_job(params.features, data_dir)
    if kind == "teacher":
        return teacher_job(name, getattr(params.teacher, name), data_dir)
    return distill_job(name, getattr(params.distill, name), data_dir, teacher_path)
