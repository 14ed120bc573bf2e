"""The report: every evaluated (model, method, sampler, nfe) point in one table.

Writes the CSV that `dvc plots` and the notebook read, a PNG of FID against
NFE on a log axis (one line per model and sampler), and a Markdown summary
with the Pareto front (the points no other point beats on both NFE and FID)
and each student against its teacher: FID relative to the teacher's best and
to the teacher's best within the same NFE budget, and the measured wall-clock
speed-up over the cheapest teacher point that is at least as good.
"""
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.results import COLUMNS  # noqa: E402
from pipeline.outputs import atomic_path  # noqa: E402


def collect(csv_paths):
    """One frame from the evaluation CSVs, sorted by model, sampler, NFE; a missing one is
    named with the stage that writes it."""
    missing = [p for p in map(Path, csv_paths) if not p.is_file()]
    if missing:
        stages = " ".join(f"evaluate@{p.parent.name}" for p in missing)
        raise PipelineError(f"{', '.join(map(str, missing))} missing: run `dvc repro {stages}`")
    frames = [pd.read_csv(p) for p in csv_paths]
    table = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    return table.sort_values(["model", "sampler", "nfe"], ignore_index=True)


def pareto_front(table):
    """Rows not dominated in (nfe, fid): nothing else has nfe <= and fid < (or < and <=)."""
    best, keep = float("inf"), []
    for _, row in table.sort_values(["nfe", "fid"]).iterrows():
        if row["fid"] < best:
            keep.append(row)
            best = row["fid"]
    return pd.DataFrame(keep, columns=table.columns).reset_index(drop=True)


def plot_fid_vs_nfe(table, path, fid_name):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (model, sampler), curve in table.groupby(["model", "sampler"], sort=True):
        ax.plot(curve["nfe"], curve["fid"], marker="o", label=f"{model} / {sampler}")
    front = pareto_front(table)
    ax.plot(front["nfe"], front["fid"], "k--", lw=1, label="Pareto front")
    ax.set(xscale="log", yscale="log", xlabel="NFE (network evaluations per sample)",
           ylabel=fid_name, title=f"{fid_name} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(table, digits=4):
    def cell(v):
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def student_comparison(table):
    """One row per student point, against the teacher it was distilled from.

    `vs_best`: student FID / the teacher's best FID at any NFE. `teacher_fid_le_nfe`:
    the teacher's best FID with at most the student's NFE. `speedup`: seconds per
    sample of the cheapest teacher point with FID <= the student's, divided by the
    student's (NaN when no teacher point is that good; `teacher_nfe_same_fid` names it).
    """
    rows = []
    for _, st in table[table["method"] != "teacher"].iterrows():
        teacher = table[(table["method"] == "teacher") & (table["model"] == st["teacher"])]
        within = teacher[teacher["nfe"] <= st["nfe"]]
        as_good = teacher[teacher["fid"] <= st["fid"]]
        match = as_good.loc[as_good["sec_per_sample"].idxmin()] if len(as_good) else None
        rows.append({
            "model": st["model"], "nfe": st["nfe"], "fid": st["fid"],
            "teacher_best_fid": teacher["fid"].min(), "vs_best": st["fid"] / teacher["fid"].min(),
            "teacher_fid_le_nfe": within["fid"].min() if len(within) else float("nan"),
            "teacher_nfe_same_fid": match["nfe"] if match is not None else float("nan"),
            "speedup": match["sec_per_sample"] / st["sec_per_sample"] if match is not None else float("nan"),
        })
    return pd.DataFrame(rows)


def summary_markdown(table, fid_name):
    best = table.loc[table.groupby("model")["fid"].idxmin()]
    parts = [
        f"# FID vs NFE\n\nFID is **{fid_name}** against the held-out test split.",
        "## Pareto front (NFE, FID)\n\n" + markdown_table(pareto_front(table)),
        "## Best point per model\n\n" + markdown_table(best),
    ]
    students = student_comparison(table)
    if len(students):
        parts.append("## Students against their teachers\n\n" + STUDENT_NOTE + "\n\n"
                     + markdown_table(students))
    parts.append("## All points\n\n" + markdown_table(table))
    return "\n\n".join(parts) + "\n"


STUDENT_NOTE = ("`vs_best`: student FID / the teacher's best FID at any NFE. `teacher_fid_le_nfe`: the "
                "teacher's best FID spending at most the student's NFE. `speedup`: measured seconds per "
                "sample of the cheapest teacher point with FID <= the student's (at NFE "
                "`teacher_nfe_same_fid`), over the student's; empty when no teacher point is that good.")


def plot_rows(table):
    """Long format for `dvc plots`: one `curve` per model/sampler."""
    rows = table.copy()
    rows.insert(0, "curve", rows["model"] + "/" + rows["sampler"])
    return rows


def write_report(csv_paths, out, fid_name):
    """Collect the evaluations into `out/`: fid_vs_nfe.csv, fid_vs_nfe_curves.csv (dvc plots),
    fid_vs_nfe.png and summary.md, each written to a temporary file and renamed onto its path."""
    table = collect(csv_paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "fid_vs_nfe.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "fid_vs_nfe_curves.csv") as tmp:
        plot_rows(table).to_csv(tmp, index=False)
    with atomic_path(out / "fid_vs_nfe.png") as tmp:
        plot_fid_vs_nfe(table, tmp, fid_name)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary_markdown(table, fid_name))
    return table
