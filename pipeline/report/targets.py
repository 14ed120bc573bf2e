"""Stated targets (params `report.targets`), each checked against the run's paired comparisons.

A "not worse" target is met when no comparison it rests on is "worse" (better or
indistinguishable at 95 %); a "better" target is met when every one is "better", missed when
one is "worse", and indistinguishable otherwise; a "faster" target is met when the measured
speed-up over the cheapest teacher point not worse than the model is at least `by`
(docs/evaluation.md, "Targets").
"""
from pipeline.report.points import Results
from pipeline.report.verdicts import cheapest_as_good


def _rows(results, model, nfe):
    rows = results.models
    return rows[(rows["model"] == model) & (rows["nfe"] == nfe)]


def point_of(results, target):
    """The model's row the target is about, or None when the run has no such point."""
    found = _rows(results, target.model, target.nfe)
    return None if found.empty else found.iloc[0]


def comparisons(results, target, point):
    """[(label of what `point` is compared with, Comparison)] at the per-comparison level: the
    target's part of the summary's family (pipeline.report.family)."""
    if target.than == "teacher_best":
        return [(" | ".join(dict.fromkeys(results.best(point["teacher"]).labels)), results.compare_best(point))]
    if target.than == "teacher_same_nfe":
        same = results.distinct(results.teacher_rows(point["teacher"]))
        against = [r for _, r in same[same["nfe"] == point["nfe"]].iterrows()]
    else:
        nfe = point["nfe"] if target.than_nfe is None else target.than_nfe
        against = [r for _, r in _rows(results, target.than, nfe).iterrows()]
    return [(results.label(b), results.compare(point, b)) for b in against]


def statement(target):
    name = f"{target.model} @ {target.nfe} NFE"
    if target.claim == "faster":
        return f"{name} at least {target.by:g}x faster than the cheapest teacher point not worse than it"
    than = {"teacher_best": "the teacher's best point", "teacher_same_nfe": "every teacher sampler at the same NFE"}
    return f"{name} {target.claim.replace('_', ' ')} than {than.get(target.than, f'{target.than} @ {target.than_nfe or target.nfe} NFE')}"


def check(results: Results, target):
    """(statement, verdict, evidence): verdict met / missed / indistinguishable at the summary's
    family level (`results.critical`), or "not evaluated" when the run has no such point."""
    point = point_of(results, target)
    if point is None:
        return statement(target), "not evaluated", f"no {target.model} point at {target.nfe} NFE in this run"
    if target.claim == "faster":
        over = cheapest_as_good(results, point)
        if over is None:
            return statement(target), "missed", "no teacher point is as good"
        ratio = over["sec_per_sample"] / point["sec_per_sample"]
        return (statement(target), "met" if ratio >= target.by else "missed",
                f"{ratio:.1f}x over {over['sampler']}@{over['nfe']} (FID {over['fid']:.3f})")
    verdicts = [(b, c.at(results.critical) if results.critical else c) for b, c in comparisons(results, target, point)]
    if not verdicts:
        return statement(target), "not evaluated", f"nothing to compare {target.model}@{target.nfe} with"
    evidence = "; ".join(f"vs {b}: {c.difference:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}] {c.verdict}" for b, c in verdicts)
    kinds = {c.verdict for _, c in verdicts}
    if target.claim == "not_worse":
        return statement(target), "missed" if "worse" in kinds else "met", evidence
    verdict = "missed" if "worse" in kinds else "met" if kinds == {"better"} else "indistinguishable"
    return statement(target), verdict, evidence
