"""summary.md, the answer a person reads first, and comparisons.md, everything behind it."""
import pandas as pd

from pipeline.report.points import Results
from pipeline.report.verdicts import ACROSS_TEACHERS, answer_table, fewest_nfe, pareto_front, speedups

# Which law a bridge teacher's samplers converge to, by its style (docs/teachers.md).
BRIDGE_LAW = {
    "i2sb": ("I2SB-style: its network never sees y, so even an exact such teacher's samplers draw from the "
             "Markovian projection of the bridge, not from p(x0 | y); its best FID is no ceiling for IBMD, whose "
             "objective targets the posterior through the teacher."),
    "ddbm": "DDBM-style: its network sees y, so an exact such teacher's samplers draw from p(x0 | y).",
}


def markdown_table(table, digits=4):
    def cell(v):
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def with_intervals(table, metrics=("fid", "kid", "precision", "recall", "psnr", "ssim", "accuracy")):
    """The table with `m [lo, hi]` cells and ms per sample."""
    out = table[["model", "method", "teacher", "sampler", "nfe"]].fillna({"teacher": ""})
    for m in metrics:
        out[m] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(v) else "" for v, lo, hi in
                  zip(table[m], table[f"{m}_lo"], table[f"{m}_hi"])]
    out["ms/sample"] = (1000 * table["sec_per_sample"]).round(2)
    return out


def protocol_lines(results: Results, protocol):
    """The protocol in a few lines (protocol.json holds all of it)."""
    nfe = sorted(results.models["nfe"].unique())
    seeds = ", ".join(map(str, protocol["sampling_seeds"])) or "one"
    inputs, levels = protocol["evaluated_inputs"], protocol["family_levels"]
    summary, listed = levels["summary"], levels["comparisons"]
    lines = [
        f"**{protocol['extractor']['fid_name']}** of {inputs['n']} evaluated test inputs' samples against "
        f"{protocol['reference']['n']} reference images, the mean over sampling seeds {seeds}; intervals from "
        f"{inputs['jackknife_groups']} jackknife groups of inputs. Precision and recall (k = 3) in the same "
        "feature space.",
        f"NFE grid {', '.join(map(str, nfe))}; NFE counts every network call of a sample (a guided step's two, "
        "CDBM's call at T that boots its ODE).",
        "The teacher's best point is chosen on one half of the inputs and compared on the other. A point is "
        "*not worse* than another when the interval of their paired FID difference does not lie above zero.",
        f"Verdicts here hold jointly at 95 % over their {summary['comparisons']} comparisons (critical value "
        f"{summary['critical_value']:.3f} standard errors); comparisons.md holds a false discovery rate of 5 % over "
        f"its {listed['comparisons']} (docs/evaluation.md, \"Many comparisons\").",
    ]
    if len(protocol["training_seeds"]) == 1:
        lines.append(f"One training seed ({protocol['training_seeds'][0]}): these verdicts do not include the "
                     "variance of retraining.")
    return "  \n".join(lines)


def summary_markdown(results: Results, entries, checked, protocol, bridge_style=None, verdicts=None):
    """The protocol, the answer (one row per model), the targets' verdicts, the students of
    different teachers at equal NFE (`verdicts`: `verdicts.comparisons`), and where the rest is."""
    parts = [
        "# How few network evaluations does each model need?\n\n" + protocol_lines(results, protocol),
        "## The answer\n\nTeachers first (any of their samplers), then the students by the NFE they need. A "
        "student's speed-up is over the cheapest teacher point not worse than it, a teacher's over its own best "
        "point; both are measured seconds per sample.\n\n" + markdown_table(answer_table(results, entries)),
    ]
    if checked:
        table = pd.DataFrame(checked, columns=["target (params report.targets)", "verdict", "evidence"])
        parts.append("## Targets\n\n" + markdown_table(table))
    if verdicts is not None:
        across = verdicts[verdicts["comparison"] == ACROSS_TEACHERS]
        if len(across):
            parts.append(
                "## Across teacher families, at the same NFE\n\nThe diffusion teacher's students start from noise "
                "and the corrupted input, the bridge teacher's from the corrupted input itself; on the same inputs "
                "and seeds their FIDs pair like any other two points. For a user of this task, this is the choice "
                "between the families at a given cost (e.g. dmd2 against ibmd at 1 NFE).\n\n"
                + markdown_table(across.drop(columns="comparison")))
    floor = results.floor
    if len(floor):
        parts.append("## Where zero is\n\nThe oracle is the evaluated inputs' own clean images, the input their "
                     "corrupted version, each scored like a model.\n\n"
                     + markdown_table(with_intervals(floor)[["model", "sampler", "fid", "accuracy"]]))
    if bridge_style and "bridge" in results.teachers:
        parts.append(f"## Which law the bridge teacher samples\n\nThe bridge teacher is {BRIDGE_LAW[bridge_style]}")
    parts.append("Every comparison, the fewest NFE per sampler, the speed-ups, the Pareto front and every point: "
                 "[comparisons.md](comparisons.md) (and comparisons.csv, fid_vs_nfe.csv); the pictures: "
                 "verdicts.png (paired differences) and fid_vs_nfe.png.")
    return "\n\n".join(parts) + "\n"


def comparisons_markdown(results: Results, verdicts, protocol):
    same = sorted({label for _, r in results.models.iterrows() if "{" in (label := results.label(r))})
    parts = [
        f"# Every comparison ({protocol['extractor']['fid_name']})\n\n`difference` is metric(a) - metric(b) "
        "(paired: the same inputs and seeds), against the teacher's best at half the inputs (chosen on the other "
        "half); its interval and verdict are at the list's level: a false discovery rate of 5 % (Benjamini-"
        f"Hochberg; intervals at {100 * protocol['family_levels']['comparisons']['interval_level']:.3g} %). "
        "`p` is the comparison's own two-sided p-value, `q` its Benjamini-Hochberg adjusted one; `better` means a "
        "is better beyond the interval (lower FID, higher precision or recall). Samplers that reach the same "
        "sample are compared once, named together in braces" + (f" ({', '.join(same)})." if same else "."),
        "## Comparisons\n\n" + markdown_table(verdicts.drop(columns="se")),
        "## Fewest NFE per sampler not worse than the teacher's best point\n\n" + markdown_table(fewest_nfe(results)),
        "## Students: measured speed-up at equal quality\n\nThe cheapest teacher point not worse than the student, "
        "and the ratio of measured seconds per sample.\n\n" + markdown_table(speedups(results)),
        "## Pareto front (NFE, FID)\n\n" + markdown_table(with_intervals(pareto_front(results.models))),
        "## All points\n\n" + markdown_table(with_intervals(results.table)),
    ]
    return "\n\n".join(parts) + "\n"
