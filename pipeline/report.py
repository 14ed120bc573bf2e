"""The report: every evaluated (model, method, sampler, nfe) point in one table.

Writes the CSV that `dvc plots` and the notebook read, a PNG of FID against
NFE on a log axis (one line per model and sampler), and a Markdown summary
with the Pareto front: the points no other point beats on both NFE and FID.
"""
import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.evaluation import COLUMNS  # noqa: E402


def collect(csv_paths):
    """One frame from the evaluation CSVs, sorted by model, sampler, NFE."""
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


def summary_markdown(table, fid_name):
    best = table.loc[table.groupby("model")["fid"].idxmin()]
    return "\n\n".join([
        f"# FID vs NFE\n\nFID is **{fid_name}** against the held-out test split.",
        "## Pareto front (NFE, FID)\n\n" + markdown_table(pareto_front(table)),
        "## Best point per model\n\n" + markdown_table(best),
        "## All points\n\n" + markdown_table(table),
    ]) + "\n"


def plot_rows(table):
    """Long format for `dvc plots`: one `curve` per model/sampler."""
    rows = table.copy()
    rows.insert(0, "curve", rows["model"] + "/" + rows["sampler"])
    return rows
