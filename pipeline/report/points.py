"""Every evaluated point of a run, with its replicates, read from the evaluation folders.

Every model was evaluated on the same inputs with the same sampling seeds, and every
evaluation folder holds the leave-a-group-out replicates of each metric
(pipeline.evaluation.results), so two points are compared pairwise (`uncertainty.compare`).

Several samplers can reach the same sample: with one network call, DDIM, DDPM, Euler, Heun
and DPM-Solver++(2M) all return the denoiser's x0 estimate, and DPM-Solver++(2M)'s second
call at 2 NFE is Euler's. Such points differ only by float round-off; `Results` names one of
them the point and the others its aliases, so that each sample is compared once.

A teacher's best point is chosen on one half of the inputs and compared on the other
(`Best`, pipeline.evaluation.selection), so choosing it does not favour the teacher.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.evaluation.results import COLUMNS, LOWER_IS_BETTER, point_key, read_halves, read_replicates
from pipeline.evaluation.selection import chosen, crossfit_difference, pair
from pipeline.evaluation.uncertainty import Point, compare, compare_replicates

FLOOR = ("oracle", "input")  # the floor stage's rows: the evaluated inputs' x0 and y
SAME_SAMPLE_RTOL = 1e-4  # every replicate of every metric this close: one sample, several samplers


class Results:
    """Every evaluated point (`table`) and its replicates, checked to share one protocol."""

    def __init__(self, folders):
        folders = [Path(f) for f in folders]
        missing = [f / "metrics.csv" for f in folders if not (f / "metrics.csv").is_file()]
        if missing:
            stages = " ".join("floor" if p.parent.name == "floor" else f"evaluate@{p.parent.name}" for p in missing)
            raise PipelineError(f"{', '.join(map(str, missing))} missing: run `dvc repro {stages}`")
        frames, self.replicates, self.halves, protocols = [], {}, {}, {}
        for folder in folders:
            table = pd.read_csv(folder / "metrics.csv")
            frames.append(table)
            protocol, points = read_replicates(folder)
            protocols[folder.name] = (protocol["n"], protocol["groups"])
            if folder.name != "floor" or not hasattr(self, "protocol"):
                self.protocol = protocol  # n, groups and a model's sampling seeds (the floor draws none)
            halves = read_halves(folder)
            for model in table["model"].unique():
                for key, metrics in points.items():
                    self.replicates[(model, key)] = metrics
                for key, metrics in halves.items():
                    self.halves[(model, key)] = pair(metrics["fid"])
        if len(set(protocols.values())) > 1:
            raise PipelineError(f"evaluations differ in inputs or groups {protocols}: rerun them with the same "
                                "evaluate.n_samples and evaluate.groups")
        self.table = pd.concat(frames, ignore_index=True)[list(COLUMNS)].sort_values(
            ["model", "sampler", "nfe"], ignore_index=True)
        self.alias_of = self._aliases()
        self.critical = None  # the summary's family: set by the report (pipeline.report.family)

    def _reps(self, row):
        return self.replicates[(row["model"], point_key(row["sampler"], row["nfe"]))]

    def _aliases(self):
        """{(model, sampler, nfe): the sampler whose point is the same sample}, for every point
        but the first (by sampler name) of each set of same samples."""
        alias_of = {}
        for (model, nfe), rows in self.table.groupby(["model", "nfe"], sort=True):
            kept = []
            for _, row in rows.iterrows():
                reps = self._reps(row)
                same = next((k for k in kept if _same_sample(reps, self._reps(k))), None)
                if same is None:
                    kept.append(row)
                else:
                    alias_of[(model, row["sampler"], nfe)] = same["sampler"]
        return alias_of

    def label(self, row):
        """`model/sampler@nfe`, every sampler of the same sample in braces: `diffusion/{ddim,euler}@1`."""
        samplers = [row["sampler"]] + sorted(s for (m, s, n), to in self.alias_of.items()
                                             if m == row["model"] and n == row["nfe"] and to == row["sampler"])
        name = samplers[0] if len(samplers) == 1 else "{" + ",".join(samplers) + "}"
        return f"{row['model']}/{name}@{row['nfe']}"

    def distinct(self, rows):
        """`rows` without the aliases: each sample once."""
        keep = [(r["model"], r["sampler"], r["nfe"]) not in self.alias_of for _, r in rows.iterrows()]
        return rows[keep]

    def point(self, row, metric="fid"):
        return Point(float(row[metric]), self._reps(row)[metric])

    def compare(self, a, b, metric="fid", critical=None):
        """a against b, paired; with `critical`, the interval +- critical * se of a family."""
        c = compare(self.point(a, metric), self.point(b, metric), lower_is_better=LOWER_IS_BETTER[metric])
        return c.at(critical) if critical else c

    def _halves(self, row):
        key = (row["model"], point_key(row["sampler"], row["nfe"]))
        if key not in self.halves:
            raise PipelineError(f"{row['model']}'s evaluation has no FID on halves of the inputs for {key[1]}: "
                                f"rerun it (dvc repro evaluate@{row['model']}) with evaluate.groups >= 4")
        return self.halves[key]

    def best(self, teacher):
        """The teacher's best point (`Best`): its lowest FID on each half of the inputs."""
        rows = self.distinct(self.teacher_rows(teacher))
        i0, i1 = chosen([self._halves(r) for _, r in rows.iterrows()])
        return Best(teacher, (rows.iloc[i0], rows.iloc[i1]), tuple(self.label(rows.iloc[i]) for i in (i0, i1)))

    def compare_best(self, point, teacher=None):
        """`point` against its teacher's best, cross-fitted (pipeline.evaluation.selection): the
        FID difference at half the inputs, with its per-comparison 95 % interval."""
        rows = self.distinct(self.teacher_rows(teacher or point["teacher"] or point["model"]))
        d, reps, _ = crossfit_difference(self._halves(point), [self._halves(r) for _, r in rows.iterrows()])
        return compare_replicates(d, reps)

    def vs_best(self, point, teacher=None):
        """`compare_best` at the summary's family level (`critical`), as the summary states it."""
        c = self.compare_best(point, teacher)
        return c.at(self.critical) if self.critical else c

    @property
    def models(self):
        return self.table[~self.table["model"].isin(FLOOR)]

    @property
    def floor(self):
        return self.table[self.table["model"].isin(FLOOR)]

    @property
    def teachers(self):
        return sorted(self.models.loc[self.models["method"] == "teacher", "model"].unique())

    def teacher_rows(self, teacher):
        return self.models[(self.models["method"] == "teacher") & (self.models["model"] == teacher)]

    def family(self, teacher):
        """The teacher's points and its students' points."""
        return self.models[(self.models["model"] == teacher) | (self.models["teacher"] == teacher)]



@dataclass(frozen=True)
class Best:
    """A teacher's best point: `rows[h]` has the lowest FID on half h of the inputs; students are
    compared with each half's choice on the other half (`Results.compare_best`)."""
    teacher: str
    rows: tuple
    labels: tuple

    @property
    def one(self):
        """Both halves chose the same point."""
        return self.labels[0] == self.labels[1]

    @property
    def fid(self):
        """The chosen points' full-set FID (their mean when the halves chose two)."""
        return float(np.mean([r["fid"] for r in self.rows]))

    def is_point(self, row):
        return self.one and all(row[k] == self.rows[0][k] for k in ("model", "sampler", "nfe"))

    def name(self):
        """`sampler@nfe (FID f)`, or both choices `a@n | b@m (FID f | g)`."""
        rows = self.rows[:1] if self.one else self.rows
        return (" | ".join(f"{r['sampler']}@{r['nfe']}" for r in rows) + " (FID "
                + " | ".join(f"{r['fid']:.3f}" for r in rows) + ")")


def _same_sample(a, b):
    return a.keys() == b.keys() and all(
        np.allclose(a[m], b[m], rtol=SAME_SAMPLE_RTOL, atol=0, equal_nan=True) for m in a)
