"""The comparisons a researcher can cite, and the answer they add up to (docs/evaluation.md).

Every comparison is paired (the same inputs and seeds): "better" or "worse" only when the
interval of the difference excludes zero, otherwise "indistinguishable"; each interval at
the level of its family (pipeline.report.family: the summary's comparisons with the
teacher's best, `Results.vs_best`, jointly at 95 %; the long list, `comparisons`, at a false
discovery rate of 5 %). A point is *not worse* than another when the interval does not lie
above zero. The answer per model: the fewest NFE at which it is not worse than its teacher's
best point (chosen on the other half of the inputs, pipeline.evaluation.selection), and the
measured speed-up over the cheapest teacher point that is not worse than it (at the
per-comparison 95 %: harder to reach, so the speed-up is not flattered).
"""
import pandas as pd

from pipeline.report.points import Results

SAME_NFE = "method vs method at the same NFE"
# Students of different teachers (e.g. a diffusion teacher's DMD2 against a bridge teacher's
# IBMD): for the task's user, the choice between teacher families at a given cost.
ACROSS_TEACHERS = "method vs method at the same NFE, other teacher"
COMPARISON_COLUMNS = ["comparison", "a", "b", "metric", "value_a", "value_b", "difference", "se", "lo", "hi", "verdict"]
PAIRED_METRICS = ("fid", "precision", "recall")  # compared at equal NFE (fidelity and diversity apart)


def _comparison(results, kind, a, b, metric="fid"):
    return _row(kind, results.label(a), results.label(b), metric, a[metric], b[metric],
                results.compare(a, b, metric))


def _row(kind, a, b, metric, value_a, value_b, c):
    return {"comparison": kind, "a": a, "b": b, "metric": metric, "value_a": value_a, "value_b": value_b,
            "difference": c.difference, "se": c.se, "lo": c.lo, "hi": c.hi, "verdict": c.verdict}


def _vs_best(results, kind, point, best):
    """`point` against the teacher's best, cross-fitted: values at the full set, the difference at half."""
    return _row(kind, results.label(point), " | ".join(dict.fromkeys(best.labels)), "fid", point["fid"], best.fid,
                results.compare_best(point, best.teacher))


def _is(a, b):
    return a["model"] == b["model"] and a["sampler"] == b["sampler"] and a["nfe"] == b["nfe"]


def comparisons(results: Results, metrics=PAIRED_METRICS):
    """Every stated comparison, one row each, each sample once: a against b on FID, and at equal
    NFE on every metric of `metrics` the run scored; each at its per-comparison 95 %
    (`family.false_discovery` then states the list at its family's level)."""
    rows, models = [], results.distinct(results.models)
    metrics = [m for m in metrics if models[m].notna().all()]
    for teacher in results.teachers:
        best = results.best(teacher)
        for _, point in results.distinct(results.family(teacher)).iterrows():
            if not best.is_point(point):
                rows.append(_vs_best(results, "vs teacher's best", point, best))
        for _, floor in results.floor.iterrows():
            rows.append(_vs_best(results, "floor vs teacher's best", floor, best))
    students = models[models["method"] != "teacher"]
    for _, st in students.iterrows():
        same = results.distinct(results.teacher_rows(st["teacher"]))
        others = students[(students["nfe"] == st["nfe"]) & (students["model"] > st["model"])]
        for metric in metrics:
            for _, t in same[same["nfe"] == st["nfe"]].iterrows():
                rows.append(_comparison(results, "vs teacher at the same NFE", st, t, metric))
            for _, other in others.iterrows():  # same inputs and seeds, whichever teacher: paired too
                kind = SAME_NFE if other["teacher"] == st["teacher"] else ACROSS_TEACHERS
                rows.append(_comparison(results, kind, st, other, metric))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _interval(c):
    return f"{c.difference:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]"


def fewest_nfe(results: Results):
    """Per model and sampler: the fewest NFE at which it is not worse than its teacher's best
    point, with its FID, the interval of the difference and the milliseconds per sample."""
    out = []
    for (model, sampler), curve in results.models.groupby(["model", "sampler"], sort=True):
        teacher = curve["teacher"].iloc[0]
        best = results.best(teacher)
        row = {"model": model, "sampler": sampler, "teacher": teacher, "teacher_best": best.name()}
        for _, point in curve.sort_values("nfe").iterrows():
            c = results.vs_best(point)
            if c.verdict != "worse":
                row.update(nfe=str(point["nfe"]), fid=f"{point['fid']:.3f}", difference=_interval(c),
                           ms_per_sample=f"{1000 * point['sec_per_sample']:.3g}")
                break
        else:
            row.update(nfe=f"not reached up to {curve['nfe'].max()}", fid="", difference="", ms_per_sample="")
        out.append(row)
    return pd.DataFrame(out)


def cheapest_as_good(results: Results, point):
    """The teacher point with the least measured time per sample that is not worse than
    `point`, or None."""
    teacher = results.teacher_rows(point["teacher"])
    as_good = [t for _, t in teacher.iterrows() if results.compare(t, point).verdict != "worse"]
    return min(as_good, key=lambda r: r["sec_per_sample"]) if as_good else None


def speedups(results: Results):
    """Per student point: the cheapest teacher point not worse than the student (its quality
    reached by the teacher), and the measured speed-up of the student over it."""
    rows = []
    for _, st in results.models[results.models["method"] != "teacher"].iterrows():
        t = cheapest_as_good(results, st)
        rows.append({"student": f"{st['model']}@{st['nfe']}", "fid": st["fid"],
                     "teacher point as good": f"{t['sampler']}@{t['nfe']} (FID {t['fid']:.3f})" if t is not None
                     else "none", "speed-up (measured)": t["sec_per_sample"] / st["sec_per_sample"]
                     if t is not None else float("nan")})
    return pd.DataFrame(rows)


def answer(results: Results):
    """One entry per model, teachers first, then the students by how few NFE they need: the
    fewest NFE at which the model (a teacher: any of its samplers) is not worse than its
    teacher's best point, or, when no NFE is, its best point. Each entry: the point, its
    comparison with the teacher's best, and the measured speed-up (a student: over the
    cheapest teacher point not worse than it; a teacher: over its own best point)."""
    entries = []
    for model, rows in results.models.groupby("model", sort=True):
        teacher = rows["teacher"].iloc[0]
        best = results.best(teacher)
        compared = [(p, results.vs_best(p)) for _, p in rows.sort_values(["nfe", "fid"]).iterrows()]
        reached = [(p, c) for p, c in compared if c.verdict != "worse"]
        point, c = reached[0] if reached else min(compared, key=lambda pc: pc[1].difference)
        is_teacher = rows["method"].iloc[0] == "teacher"
        over = best.rows[0] if is_teacher else cheapest_as_good(results, point)
        entries.append({
            "model": model, "teacher": teacher, "is_teacher": is_teacher, "reached": bool(reached),
            "max_nfe": int(rows["nfe"].max()), "min_nfe": int(rows["nfe"].min()), "point": point, "vs_best": c, "best": best, "over": over,
            "speedup": over["sec_per_sample"] / point["sec_per_sample"] if over is not None else None})
    return sorted(entries, key=lambda e: (not e["is_teacher"], not e["reached"],
                                          e["point"]["nfe"] if e["reached"] else 0, e["vs_best"].difference))


def answer_table(results: Results, entries):
    """The summary's first table: one row per entry of `answer`, every cell filled."""
    rows = []
    for e in entries:
        p, c = e["point"], e["vs_best"]
        name = f"{e['model']} (teacher)" if e["is_teacher"] else f"{e['model']} (distils {e['teacher']})"
        where = f"{p['nfe']} ({p['sampler']})" if e["is_teacher"] else str(p["nfe"])
        rows.append({
            "model": name,
            "fewest NFE not worse than the teacher's best": where if e["reached"] else _not_reached(e),
            "FID there [95 %]": f"{p['fid']:.3f} [{p['fid_lo']:.3f}, {p['fid_hi']:.3f}]",
            "minus the teacher's best": _interval(c) + (" (the best point)" if e["best"].is_point(p) else ""),
            "ms/sample": f"{1000 * p['sec_per_sample']:.3g}",
            "measured speed-up": _speedup_cell(results, e)})
    return pd.DataFrame(rows)


def _not_reached(e):
    if e["max_nfe"] == e["point"]["nfe"] == e["min_nfe"]:
        return f"not reached at {e['max_nfe']}"
    return f"not reached up to {e['max_nfe']}; closest at {e['point']['nfe']}"


def _speedup_cell(results, e):
    if e["over"] is None:
        return "no teacher point as good"
    if _is(e["over"], e["point"]):
        return "1x (its best point)"
    over = f"{e['over']['sampler']}@{e['over']['nfe']}"
    return f"{e['speedup']:.1f}x over {'its best point, ' if e['is_teacher'] else ''}{over}"


def headline(entries):
    """`results/headline.json`: per model, the numbers `dvc exp show` compares across runs."""
    out = {}
    for e in entries:
        p = e["point"]
        out[e["model"]] = {"fewest_nfe": int(p["nfe"]) if e["reached"] else None, "fid": round(float(p["fid"]), 4),
                           "teacher_best_fid": round(e["best"].fid, 4),
                           "speedup": round(float(e["speedup"]), 2) if e["speedup"] is not None else None}
    return out


def pareto_front(table):
    """Rows not dominated in (nfe, fid): nothing else has nfe <= and fid < (or < and <=)."""
    best, keep = float("inf"), []
    for _, row in table.sort_values(["nfe", "fid"]).iterrows():
        if row["fid"] < best:
            keep.append(row)
            best = row["fid"]
    return pd.DataFrame(keep, columns=table.columns).reset_index(drop=True)
