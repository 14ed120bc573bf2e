"""The report's pictures and the tables `dvc plots` draws.

`fid_vs_nfe.png` draws each point's own FID with its 95 % interval: at a few hundred
evaluated inputs these bands are wide and overlap. `verdicts.png` draws what the verdicts
rest on: each point's paired FID difference to its teacher's best point, with the interval
of that difference, which is much narrower (common inputs and seeds, docs/evaluation.md).
"""
import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.report.points import FLOOR, Results  # noqa: E402


def plot_fid_vs_nfe(results: Results, path, fid_name):
    """One panel per teacher: its samplers (dashed) and its students (solid), each with its 95 %
    band, and the floor: the oracle (dotted) and the input (dash-dot, or noted when off scale)."""
    models, floor = results.models, results.floor
    fig, axes = plt.subplots(1, len(results.teachers), figsize=(6.5 * len(results.teachers), 4.8), squeeze=False,
                             sharey=True)
    top = 1.3 * models["fid_hi"].quantile(0.95)
    bottom = 0.7 * min(models["fid"].min(), floor["fid"].min() if len(floor) else float("inf"))
    for ax, teacher in zip(axes[0], results.teachers):
        for (model, sampler), curve in results.family(teacher).groupby(["model", "sampler"], sort=True):
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
    fig.suptitle("bands: each point's own 95 % interval; verdicts.png draws the paired differences, "
                 "which are much narrower (common inputs and seeds)", fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict_rows(results: Results):
    """Long format of the verdict picture: per teacher family (`family`), one `curve` per
    sampler and student, each point's paired FID difference to the teacher's best point with
    its interval (`lo`, `hi`) and verdict as the summary states them (`Results.vs_best`: chosen
    on one half of the inputs, compared on the other, at the summary's family level); the
    floor's rows (NFE 0) as flat curves across the family's NFE range. `point` is the point's
    label (samplers of the same sample named together)."""
    rows = []
    for teacher in results.teachers:
        family, best = results.family(teacher), results.best(teacher)
        for _, p in family.iterrows():
            canonical = p.copy()
            canonical["sampler"] = results.alias_of.get((p["model"], p["sampler"], p["nfe"]), p["sampler"])
            c = results.vs_best(canonical)
            rows.append(dict(family=teacher, curve=p["model"] if p["sampler"] == "student" else f"{p['model']} / "
                             f"{p['sampler']}", nfe=p["nfe"], point=results.label(canonical), difference=c.difference,
                             lo=c.lo, hi=c.hi, verdict="the teacher's best" if best.is_point(p) else c.verdict))
        ends = [family["nfe"].min(), family["nfe"].max()]
        for _, f in results.floor.iterrows():
            c = results.vs_best(f, teacher)
            for nfe in ends:
                rows.append(dict(family=teacher, curve=f"{f['model']} (floor)", nfe=nfe, point=results.label(f),
                                 difference=c.difference, lo=c.lo, hi=c.hi, verdict=c.verdict))
    return pd.DataFrame(rows, columns=["family", "curve", "nfe", "point", "difference", "lo", "hi", "verdict"])


def plot_verdicts(rows, path, fid_name):
    """One panel per teacher family: each curve's paired difference to the teacher's best point
    against log NFE, with its 95 % band; zero is the teacher's best, the oracle (dotted) is
    the floor: how far below the best point a perfect model would score."""
    families = list(dict.fromkeys(rows["family"]))
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.8), squeeze=False)
    for ax, family in zip(axes[0], families):
        shown = rows[(rows["family"] == family) & (rows["curve"] != "input (floor)")]
        for curve, r in shown.groupby("curve", sort=True):
            floor, student = curve.endswith("(floor)"), " / " not in curve and not curve.endswith("(floor)")
            style = ":" if floor else "-" if student else "--"
            line, = ax.plot(r["nfe"], r["difference"], style, marker=None if floor else "o", ms=3,
                            color="k" if floor else None, lw=2 if student else 1, label=curve)
            ax.fill_between(r["nfe"], r["lo"], r["hi"], color=line.get_color(), alpha=0.1, lw=0)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set(xscale="log", title=f"{family} and its students: minus the teacher's best point",
               xlabel="NFE (network evaluations per sample)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        off = rows[(rows["family"] == family) & (rows["curve"] == "input (floor)")]
        if len(off):
            ax.text(0.98, 0.97, f"input (floor): {off['difference'].iloc[0]:+.2f}, not drawn", ha="right", va="top",
                    transform=ax.transAxes, fontsize=7)
    axes[0][0].set_ylabel(f"{fid_name} minus the teacher's best (paired 95 % band)")
    fig.suptitle("below zero: better than the teacher's best point; a band that holds zero: indistinguishable",
                 fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rows(table):
    """Long format for `dvc plots` of FID: one `curve` per model/sampler, with the interval
    columns; the floor's rows (NFE 0) as flat curves across the models' NFE range."""
    models, floor = table[~table["model"].isin(FLOOR)], table[table["model"].isin(FLOOR)]
    ends = [models["nfe"].min(), models["nfe"].max()]
    flat = pd.concat([floor.assign(nfe=n) for n in ends], ignore_index=True) if len(models) else floor
    rows = pd.concat([models, flat], ignore_index=True)
    rows.insert(0, "curve", rows["model"] + "/" + rows["sampler"])
    return rows
