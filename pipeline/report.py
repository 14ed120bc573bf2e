"""The report: every evaluated point with its interval, the floor, and the comparisons a
researcher can cite, each with the interval of the difference (docs/evaluation.md).

Every model was evaluated on the same inputs with the same sampling seeds, and every
evaluation folder holds the leave-a-group-out replicates of each metric
(pipeline.evaluation.results), so two points are compared pairwise (`uncertainty.compare`): "better"
or "worse" only when the 95 % interval of the difference excludes zero, otherwise
"indistinguishable". The summary opens with the answer the pipeline exists for: the
fewest NFE at which each model is not worse than its teacher's best point, and the
fastest way to reach that quality.

Writes fid_vs_nfe.csv (every point), fid_vs_nfe_curves.csv (`dvc plots`), comparisons.csv
(every stated comparison), fid_vs_nfe.png (bands and the floor) and summary.md.
"""
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.evaluation.results import COLUMNS, point_key, read_replicates  # noqa: E402
from pipeline.evaluation.uncertainty import Point, compare  # noqa: E402
from pipeline.runtime.outputs import atomic_path  # noqa: E402

FLOOR = ("oracle", "input")  # the floor stage's rows: the evaluated inputs' x0 and y

# Which law a bridge teacher's samplers converge to, by its style (docs/teachers.md).
BRIDGE_LAW = {
    "i2sb": ("I2SB-style: its network never sees y, so even an exact such teacher's samplers draw from the "
             "Markovian projection of the bridge, not from p(x0 | y); its best FID is no ceiling for IBMD, whose "
             "objective targets the posterior through the teacher."),
    "ddbm": "DDBM-style: its network sees y, so an exact such teacher's samplers draw from p(x0 | y).",
}


class Results:
    """Every evaluated point (a table) and its replicates, checked to share one protocol."""

    def __init__(self, folders):
        folders = [Path(f) for f in folders]
        missing = [f / "metrics.csv" for f in folders if not (f / "metrics.csv").is_file()]
        if missing:
            stages = " ".join("floor" if p.parent.name == "floor" else f"evaluate@{p.parent.name}" for p in missing)
            raise PipelineError(f"{', '.join(map(str, missing))} missing: run `dvc repro {stages}`")
        frames, self.replicates, protocols = [], {}, {}
        for folder in folders:
            table = pd.read_csv(folder / "metrics.csv")
            frames.append(table)
            protocol, points = read_replicates(folder)
            protocols[folder.name] = (protocol["n"], protocol["groups"])
            for model in table["model"].unique():
                for key, metrics in points.items():
                    self.replicates[(model, key)] = metrics
        if len(set(protocols.values())) > 1:
            raise PipelineError(f"evaluations differ in inputs or groups {protocols}: rerun them with the same "
                                "evaluate.n_samples and evaluate.groups")
        self.table = pd.concat(frames, ignore_index=True)[list(COLUMNS)].sort_values(
            ["model", "sampler", "nfe"], ignore_index=True)

    def point(self, row, metric="fid"):
        return Point(float(row[metric]), self.replicates[(row["model"], point_key(row["sampler"], row["nfe"]))][metric])

    def compare(self, a, b, metric="fid"):
        return compare(self.point(a, metric), self.point(b, metric), lower_is_better=metric in ("fid", "kid"))

    @property
    def models(self):
        return self.table[~self.table["model"].isin(FLOOR)]

    def teacher_rows(self, teacher):
        return self.models[(self.models["method"] == "teacher") & (self.models["model"] == teacher)]

    def best(self, rows):
        return rows.loc[rows["fid"].idxmin()]


def _comparison(kind, a, b, c):
    return {"comparison": kind, "a": f"{a['model']}/{a['sampler']}@{a['nfe']}",
            "b": f"{b['model']}/{b['sampler']}@{b['nfe']}", "fid_a": a["fid"], "fid_b": b["fid"],
            "difference": c.difference, "lo": c.lo, "hi": c.hi, "verdict": c.verdict}


def comparisons(results: Results):
    """Every comparison the summary states, one row each: a against b on FID."""
    rows, models = [], results.models
    for teacher in models.loc[models["method"] == "teacher", "model"].unique():
        family = models[(models["model"] == teacher) | (models["teacher"] == teacher)]
        best = results.best(results.teacher_rows(teacher))
        for _, point in family.iterrows():
            if point["model"] == best["model"] and point["sampler"] == best["sampler"] and point["nfe"] == best["nfe"]:
                continue
            rows.append(_comparison("vs teacher's best", point, best, results.compare(point, best)))
    students = models[models["method"] != "teacher"]
    for _, st in students.iterrows():
        same = results.teacher_rows(st["teacher"])
        for _, t in same[same["nfe"] == st["nfe"]].iterrows():
            rows.append(_comparison("vs teacher at the same NFE", st, t, results.compare(st, t)))
        others = students[(students["teacher"] == st["teacher"]) & (students["nfe"] == st["nfe"])
                          & (students["model"] > st["model"])]
        for _, other in others.iterrows():
            rows.append(_comparison("method vs method at the same NFE", st, other, results.compare(st, other)))
    return pd.DataFrame(rows, columns=["comparison", "a", "b", "fid_a", "fid_b", "difference", "lo", "hi", "verdict"])


def fewest_nfe(results: Results):
    """Per model (and sampler, for a teacher): the fewest NFE at which it is not worse than its
    teacher's best point, with its FID, interval of the difference and seconds per sample."""
    out, models = [], results.models
    for (model, sampler), curve in models.groupby(["model", "sampler"], sort=True):
        teacher = curve["teacher"].iloc[0]
        best = results.best(results.teacher_rows(teacher))
        found = None
        for _, point in curve.sort_values("nfe").iterrows():
            c = results.compare(point, best)
            if c.verdict != "worse":
                found = (point, c)
                break
        row = {"model": model, "sampler": sampler, "teacher": teacher,
               "teacher_best": f"{best['sampler']}@{best['nfe']} (FID {best['fid']:.3f})"}
        if found:
            point, c = found
            row.update(nfe=point["nfe"], fid=point["fid"], difference=f"{c.difference:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]",
                       ms_per_sample=1000 * point["sec_per_sample"])
        else:
            row.update(nfe="none of those evaluated", fid=float("nan"), difference="", ms_per_sample=float("nan"))
        out.append(row)
    return pd.DataFrame(out)


def fastest_to_teacher_best(results: Results, reach):
    """Per teacher: the point of its family (its samplers and its students) not worse than the
    teacher's best with the least measured time per sample."""
    rows = []
    for teacher, group in reach[reach["nfe"] != "none of those evaluated"].groupby("teacher"):
        fastest = group.loc[group["ms_per_sample"].astype(float).idxmin()]
        rows.append({"teacher": teacher, "fastest": f"{fastest['model']}/{fastest['sampler']} at {fastest['nfe']} NFE",
                     "ms_per_sample": fastest["ms_per_sample"], "fid": fastest["fid"],
                     "vs teacher's best": fastest["difference"]})
    return pd.DataFrame(rows)


def speedups(results: Results):
    """Per student point: the cheapest teacher point not worse than the student (its quality
    reached by the teacher), and the measured speed-up of the student over it."""
    rows = []
    models = results.models
    for _, st in models[models["method"] != "teacher"].iterrows():
        teacher = results.teacher_rows(st["teacher"])
        as_good = [t for _, t in teacher.iterrows() if results.compare(t, st).verdict != "worse"]
        if as_good:
            t = min(as_good, key=lambda r: r["sec_per_sample"])
            rows.append({"student": f"{st['model']}@{st['nfe']}", "fid": st["fid"],
                         "teacher point as good": f"{t['sampler']}@{t['nfe']} (FID {t['fid']:.3f})",
                         "speed-up (measured)": t["sec_per_sample"] / st["sec_per_sample"]})
        else:
            rows.append({"student": f"{st['model']}@{st['nfe']}", "fid": st["fid"],
                         "teacher point as good": "none", "speed-up (measured)": float("nan")})
    return pd.DataFrame(rows)


def pareto_front(table):
    """Rows not dominated in (nfe, fid): nothing else has nfe <= and fid < (or < and <=)."""
    best, keep = float("inf"), []
    for _, row in table.sort_values(["nfe", "fid"]).iterrows():
        if row["fid"] < best:
            keep.append(row)
            best = row["fid"]
    return pd.DataFrame(keep, columns=table.columns).reset_index(drop=True)


def plot_fid_vs_nfe(results: Results, path, fid_name):
    """One panel per teacher: its samplers (dashed) and its students (solid), each with its 95 %
    band, and the floor: the oracle (dotted) and the input (dash-dot, or noted when off scale)."""
    models, floor = results.models, results.table[results.table["model"].isin(FLOOR)]
    teachers = sorted(models.loc[models["method"] == "teacher", "model"].unique())
    fig, axes = plt.subplots(1, len(teachers), figsize=(6.5 * len(teachers), 4.8), squeeze=False, sharey=True)
    top = 1.3 * models["fid_hi"].quantile(0.95)
    bottom = 0.7 * min(models["fid"].min(), floor["fid"].min() if len(floor) else float("inf"))
    for ax, teacher in zip(axes[0], teachers):
        family = models[(models["model"] == teacher) | (models["teacher"] == teacher)]
        for (model, sampler), curve in family.groupby(["model", "sampler"], sort=True):
            student = sampler == "student"
            line, = ax.plot(curve["nfe"], curve["fid"], "-" if student else "--", marker="o", ms=3,
                            lw=2 if student else 1, label=model if student else f"{model} / {sampler}")
            ax.fill_between(curve["nfe"], curve["fid_lo"].clip(lower=bottom), curve["fid_hi"].clip(upper=top),
                            color=line.get_color(), alpha=0.08, lw=0)
        for _, row in floor.iterrows():
            label = f"{row['model']} ({row['sampler']}): {row['fid']:.2f}"
            if row["fid"] > top:
                ax.text(0.02, 0.97, f"{label}, off scale", transform=ax.transAxes, va="top", fontsize=7)
                continue
            ax.axhline(row["fid"], color="k", ls=":" if row["model"] == "oracle" else "-.", lw=1, label=label)
            ax.axhspan(max(row["fid_lo"], bottom), min(row["fid_hi"], top), color="k", alpha=0.06, lw=0)
        ax.set(xscale="log", yscale="log", ylim=(bottom, top), title=f"{teacher} and its students",
               xlabel="NFE (network evaluations per sample)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel(f"{fid_name} (bands: 95 % intervals)")
    fig.suptitle("bands: each point's own 95 % interval; the paired differences of summary.md are much "
                 "narrower (common inputs and seeds)", fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(table, digits=4):
    def cell(v):
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def with_intervals(table, metrics=("fid", "kid", "psnr", "ssim", "accuracy")):
    """The table with `m [lo, hi]` cells and ms per sample."""
    out = table[["model", "method", "teacher", "sampler", "nfe"]].fillna({"teacher": ""})
    for m in metrics:
        out[m] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(v) else "" for v, lo, hi in
                  zip(table[m], table[f"{m}_lo"], table[f"{m}_hi"])]
    out["ms/sample"] = (1000 * table["sec_per_sample"]).round(2)
    return out


def summary_markdown(results: Results, verdicts, fid_name, bridge_style=None):
    reach = fewest_nfe(results)
    floor = results.table[results.table["model"].isin(FLOOR)]
    parts = [
        f"# How few network evaluations does each model need?\n\nFID is **{fid_name}** of the evaluated test "
        "inputs' samples against the reference split, the mean over the sampling seeds; every interval is 95 % "
        "(docs/evaluation.md). A point is *not worse* than another when the interval of their paired FID "
        "difference does not lie above zero.",
        "## Fewest NFE not worse than the teacher's best point\n\n" + markdown_table(reach),
        "## Fastest way to the teacher's best quality\n\n" + markdown_table(fastest_to_teacher_best(results, reach)),
        "## Where zero is\n\nThe oracle is the evaluated inputs' own clean images, the input their corrupted "
        "version, each scored like a model.\n\n" + markdown_table(with_intervals(floor)),
        *([f"## Which law the bridge teacher samples\n\nThe bridge teacher is {BRIDGE_LAW[bridge_style]}"]
          if bridge_style and "bridge" in set(results.models["model"]) else []),
        "## Students: measured speed-up at equal quality\n\nThe cheapest teacher point not worse than the student, "
        "and the ratio of measured seconds per sample.\n\n" + markdown_table(speedups(results)),
        "## Comparisons\n\n`difference` is FID(a) - FID(b) with its 95 % interval (paired: the same inputs and "
        "seeds); `better` means a's FID is lower beyond the interval.\n\n" + markdown_table(verdicts),
        "## Pareto front (NFE, FID)\n\n" + markdown_table(with_intervals(pareto_front(results.models))),
        "## All points\n\n" + markdown_table(with_intervals(results.table)),
    ]
    return "\n\n".join(parts) + "\n"


def plot_rows(table):
    """Long format for `dvc plots`: one `curve` per model/sampler, with the interval columns;
    the floor's rows (NFE 0) as flat curves across the models' NFE range."""
    models, floor = table[~table["model"].isin(FLOOR)], table[table["model"].isin(FLOOR)]
    ends = [models["nfe"].min(), models["nfe"].max()]
    flat = pd.concat([floor.assign(nfe=n) for n in ends], ignore_index=True) if len(models) else floor
    rows = pd.concat([models, flat], ignore_index=True)
    rows.insert(0, "curve", rows["model"] + "/" + rows["sampler"])
    return rows


def write_report(folders, out, fid_name, bridge_style=None):
    """Collect the evaluation folders into `out/` (module docstring), each file written to a
    temporary file and renamed onto its path."""
    results = Results(folders)
    verdicts = comparisons(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "fid_vs_nfe.csv") as tmp:
        results.table.to_csv(tmp, index=False)
    with atomic_path(out / "fid_vs_nfe_curves.csv") as tmp:
        plot_rows(results.table).to_csv(tmp, index=False)
    with atomic_path(out / "comparisons.csv") as tmp:
        verdicts.to_csv(tmp, index=False)
    with atomic_path(out / "fid_vs_nfe.png") as tmp:
        plot_fid_vs_nfe(results, tmp, fid_name)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary_markdown(results, verdicts, fid_name, bridge_style))
    return results.table
