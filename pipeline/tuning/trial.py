"""One sweep trial: the stage's own training job with the trial's params, scored as it trains.

A trial runs the stage's `TrainingJob` (pipeline.training.jobs) under Ray Train with one report
hook, `QuickEval`: at each checkpoint, rank 0 writes the stage's checkpoint format to a
temporary file and scores it with the pipeline's own sampling and `score_points`
(pipeline.evaluation.sampling), so a trial's FID is the pipeline's FID on a smaller sample. The
trial logs into an MLflow child run of the sweep's run. It runs inside a Ray Tune trial
(pipeline.tuning.tuner.tune).
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.config.schema import parse_params
from pipeline.training.jobs import params_section
from pipeline.tuning.sweep import Objective, SweepSpec, apply_overrides, integer_keys


@dataclass(frozen=True)
class QuickEval:
    """Report hook (ray_train.ReportContext): the objective at each checkpoint, on rank 0,
    logged as `sweep/<metric>` and added to the report that Tune (ASHA) sees."""
    stage: str
    objective: Objective
    data_dir: str
    features_dir: str
    seed: int
    write: Any  # TrainingJob.write
    log: Optional[Callable[[dict, int], None]] = None

    def __call__(self, metrics, state, context):
        if state is None or context.rank != 0:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            self.write(path, state)
            scores = {"accuracy": self._accuracy(path)} if self.stage == "features" else self._fidelity(path)
        if self.log is not None:
            self.log({f"sweep/{k}": v for k, v in scores.items()}, metrics["step"])
            if hasattr(self.log, "flush"):  # sent before Tune sees the score: ASHA may stop the trial on it
                self.log.flush()
        return scores

    def _accuracy(self, path):
        from pipeline.features.classifier import accuracy, load_classifier
        from pipeline.data.shards import load_split
        test = load_split(self.data_dir, "test").head(self.objective.n_samples)
        return accuracy(load_classifier(path), test.x0, test.label)

    def _fidelity(self, path):
        from pipeline.data.shards import load_split
        from pipeline.evaluation.sampling import ShardJob, by_point, sample_shard, score_all
        from pipeline.models.loading import load_model
        from pipeline.evaluation.results import FeatureSpace
        from pipeline.evaluation.scoring import Scorer
        obj = self.objective
        sampler, nfe = sampling_point(load_model(path), obj)
        job = ShardJob(str(path), self.data_dir, 0, obj.n_samples, ((sampler, nfe),), self.seed, 0.0,
                       obj.batch_size, threads=1)
        truth = load_split(self.data_dir, "test").head(obj.n_samples)
        scorer = Scorer(FeatureSpace.load(self.features_dir), obj.n_samples, min(20, obj.n_samples),
                        truth.x0.shape[1:])
        (row,), _ = score_all(by_point(sample_shard(job), [self.seed]), truth, scorer)
        return {obj.metric: row[obj.metric], "nfe": nfe}


def sampling_point(model, objective: Objective):
    """(sampler, nfe) the objective evaluates `model` at; ValueError if it cannot."""
    from pipeline.models.students import Student
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
    teacher_path: Optional[str]  # a student's teacher checkpoint (None for other stages)
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
    from pipeline.training.ray_train import fit
    from pipeline.training.jobs import training_job
    from pipeline.runtime.tracking import trial_run
    overrides = trial_overrides(setup, config)
    params = parse_params(apply_overrides(setup.raw_params, overrides), source=f"trial {trial_id}")
    job = training_job(setup.spec.stage, params, setup.data_dir, setup.teacher_path)
    tags = {**job.tags, "stage": "sweep_trial", "sweep": setup.sweep, "trial_id": trial_id,
            "sweep_stage": setup.spec.stage}
    logged = {**overrides, "objective": setup.spec.objective.model_dump()}
    with trial_run(setup.tracking_uri, setup.parent_run_id, f"{setup.sweep}/{trial_id}", tags, logged) as run:
        score = QuickEval(setup.spec.stage, setup.spec.objective, setup.data_dir, setup.features_dir,
                          params.evaluate.seeds[0], job.write, log=run.logger())
        fit(job.run(params.seed, params.ray, log=run.logger(), hooks=[score]), setup.storage,
            f"trial-{trial_id}", callbacks=callbacks, partial_ok=True)  # ASHA may stop it early
