"""The report of a run: the answer first, every comparison behind it (docs/evaluation.md).

`write_report` reads the evaluation folders (`points.Results`), states the paired
comparisons (`verdicts`) each at the level of its family (`family`: the summary's verdicts
hold jointly, the long list controls its false discovery rate), checks the stated targets
(`targets`), and writes into `out/`:

- summary.md: the protocol, one row per model (the fewest NFE not worse than its teacher's
  best point, the FID and ms/sample there, the measured speed-up), the targets' verdicts;
- comparisons.md: every comparison, the fewest NFE per sampler, the speed-ups, the Pareto
  front and every point; comparisons.csv and fid_vs_nfe.csv the same as tables;
- headline.json: per model, the numbers `dvc exp show` compares across experiments;
- protocol.json: how the numbers were measured (`protocol`), which must agree for two runs to compare;
- verdicts.png / verdicts.csv: each point's paired difference to its teacher's best point;
- fid_vs_nfe.png / fid_vs_nfe_curves.csv: each point's FID with its own interval.

Each file is written to a temporary file and renamed onto its path.
"""
import json
from pathlib import Path

from pipeline.report.documents import comparisons_markdown, summary_markdown
from pipeline.report.family import false_discovery, summary_critical, summary_family
from pipeline.report.figures import plot_fid_vs_nfe, plot_rows, plot_verdicts, verdict_rows
from pipeline.report.points import Results
from pipeline.report.protocol import run_protocol
from pipeline.report.targets import check
from pipeline.report.verdicts import answer, comparisons, headline
from pipeline.runtime.outputs import atomic_path


def write_report(folders, out, info, bridge_style=None, targets=(), grid="fair", training_seeds=(0,), commit=None):
    """The report of the evaluation `folders` into `out`; `info`: the features stage's info.json."""
    results = Results(folders)
    family = summary_family(results, targets)
    results.critical = summary_critical(family)  # every summary verdict below is at this level
    verdicts, fdr = false_discovery(comparisons(results), df=results.protocol["groups"] - 1)
    entries, rows = answer(results), verdict_rows(results)
    levels = {"summary": {"comparisons": len(family), "critical_value": results.critical},
              "comparisons": {"comparisons": len(verdicts), "interval_level": fdr}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"fid_vs_nfe.csv": results.table, "fid_vs_nfe_curves.csv": plot_rows(results.table),
              "comparisons.csv": verdicts, "verdicts.csv": rows}
    for name, table in tables.items():
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False)
    fid_name = info["fid_name"]
    with atomic_path(out / "fid_vs_nfe.png") as tmp:
        plot_fid_vs_nfe(results, tmp, fid_name)
    with atomic_path(out / "verdicts.png") as tmp:
        plot_verdicts(rows, tmp, fid_name)
    protocol = run_protocol(results, info, grid, training_seeds, levels, commit)
    texts = {"summary.md": summary_markdown(results, entries, [check(results, t) for t in targets], protocol,
                                            bridge_style, verdicts),
             "comparisons.md": comparisons_markdown(results, verdicts, protocol),
             "headline.json": json.dumps(headline(entries), indent=2) + "\n",
             "protocol.json": json.dumps(protocol, indent=2) + "\n"}
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    return results.table
