"""One sweep trial: the stage's own training job with the trial's params, scored as it trains.

A trial runs the stage's `TrainingJob` (pipeline.jobs) under Ray Train, writes the
stage's checkpoint format at each checkpoint to score it with the pipeline's own
sampling and FID (pipeline.evaluation), and logs into an MLflow child run of the
sweep's run. It runs inside a Ray Tune trial (pipeline.distributed.tune).
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import parse_params
from pipeline.jobs import params_section
from pipeline.sweep import Objective, SweepSpec, apply_overrides, integer_keys


@dataclass(frozen=True)
class QuickEval:
    """The objective of a trial, computed on rank 0 at each checkpoint of its training:
    the stage's checkpoint is written to a temporary file and scored by the pipeline's own
    evaluation code, so a trial's FID is the pipeline's FID on a smaller sample."""
    stage: str
    objective: Objective
    data_dir: str
    features_dir: str
    seed: int
    write: Any  # TrainingJob.write

    def __call__(self, state) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            self.write(path, state)
            if self.stage == "features":
                return {"accuracy": self._accuracy(path)}
            return self._fidelity(path)

    def _accuracy(self, path):
        from pipeline.classifier import accuracy, load_classifier
        from pipeline.data.shards import load_split
        test = load_split(self.data_dir, "test").head(self.objective.n_samples)
        return accuracy(load_classifier(path), test.x0, test.label)

    def _fidelity(self, path):
        import json

        from pipeline.evaluation import ShardJob, load_model, sample_shard
        from pipeline.fid import fidelity_metrics
        obj = self.objective
        sampler, nfe = sampling_point(load_model(path), obj)
        job = ShardJob(str(path), self.data_dir, 0, obj.n_samples, ((sampler, nfe),), self.seed, 0.0,
                       obj.batch_size, threads=1)
        samples = sample_shard(job)[(sampler, nfe)][0]
        features = Path(self.features_dir)
        info = json.loads((features / "info.json").read_text())
        scores = fidelity_metrics(samples, extractor=info["extractor"], cache_root=str(features / "fid_cache"),
                                  reference_cache_name=info["reference"], kid_subset_size=min(100, obj.n_samples),
                                  weights_path=str(features / "classifier.pt"))
        return {obj.metric: scores[obj.metric], "nfe": nfe}


def sampling_point(model, objective: Objective):
    """(sampler, nfe) the objective evaluates `model` at; ValueError if it cannot."""
    from pipeline.distill import Student
    from pipeline.samplers import get_sampler, steps_for_nfe
    if isinstance(model, Student):
        choices = model.method.nfe_choices()
        nfe = objective.nfe or min(choices)
        if nfe not in choices:
            raise ValueError(f"objective.nfe={nfe}: this {model.name} student samples with nfe in {choices}")
        return "student", nfe
    if objective.nfe is None or objective.sampler is None:
        raise ValueError("a teacher sweep needs objective.nfe and objective.sampler")
    sampler = get_sampler(f"{model.family}/{objective.sampler}")
    steps = steps_for_nfe(sampler, objective.nfe)
    if steps is None or sampler.nfe_of_steps(steps) != objective.nfe:
        raise ValueError(f"objective.nfe={objective.nfe} is not a step count of the {sampler.key} sampler")
    return objective.sampler, objective.nfe


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, picklable: it runs inside a Ray Tune trial."""
    sweep: str
    spec: SweepSpec
    raw_params: dict  # the project's params.yaml
    data_dir: str
    models_dir: str
    features_dir: str
    storage: str  # Ray Train runs of the trials go below this folder
    tracking_uri: str
    parent_run_id: str


def trial_overrides(setup: TrialSetup, config):
    """The fixed overrides, the trial's values, and the evaluation cadence as checkpoints."""
    section = params_section(setup.spec.stage)
    integers = integer_keys(setup.spec, setup.raw_params)
    values = {k: int(round(v)) if k in integers else v for k, v in config.items()}
    return {**setup.spec.fixed, **values, f"{section}.train.checkpoint_every": setup.spec.eval_every}


def run_trial(setup: TrialSetup, config, trial_id, callbacks):
    """One trial: the stage's training job with the trial's params, scored as it trains."""
    from pipeline.distributed import fit
    from pipeline.jobs import training_job
    from pipeline.tracking import trial_run
    overrides = trial_overrides(setup, config)
    params = parse_params(apply_overrides(setup.raw_params, overrides), source=f"trial {trial_id}")
    job = training_job(setup.spec.stage, params, setup.data_dir, setup.models_dir)
    score = QuickEval(setup.spec.stage, setup.spec.objective, setup.data_dir, setup.features_dir,
                      params.evaluate.seed, job.write)
    tags = {**job.tags, "stage": "sweep_trial", "sweep": setup.sweep, "trial_id": trial_id,
            "sweep_stage": setup.spec.stage}
    logged = {**overrides, "objective": setup.spec.objective.model_dump()}
    with trial_run(setup.tracking_uri, setup.parent_run_id, f"{setup.sweep}/{trial_id}", tags, logged) as run:
        fit(job.task, job.load_data, job.train, params.seed, params.ray, setup.storage,
            name=f"trial-{trial_id}", log=run.logger(), callbacks=callbacks, score=score)
