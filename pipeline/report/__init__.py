"""The report of a run: the answer first, every comparison behind it (docs/evaluation.md).

`write_report` reads the evaluation folders (`points.Results`), states the paired
comparisons (`verdicts`), checks the stated targets (`targets`), and writes into `out/`:

- summary.md: the protocol, one row per model (the fewest NFE not worse than its teacher's
  best point, the FID and ms/sample there, the measured speed-up), the targets' verdicts;
- comparisons.md: every comparison, the fewest NFE per sampler, the speed-ups, the Pareto
  front and every point; comparisons.csv and fid_vs_nfe.csv the same as tables;
- headline.json: per model, the numbers `dvc exp show` compares across experiments;
- verdicts.png / verdicts.csv: each point's paired difference to its teacher's best point;
- fid_vs_nfe.png / fid_vs_nfe_curves.csv: each point's FID with its own interval.

Each file is written to a temporary file and renamed onto its path.
"""
import json
from pathlib import Path

from pipeline.report.documents import comparisons_markdown, summary_markdown
from pipeline.report.figures import plot_fid_vs_nfe, plot_rows, plot_verdicts, verdict_rows
from pipeline.report.points import Results
from pipeline.report.targets import check
from pipeline.report.verdicts import answer, comparisons, headline
from pipeline.runtime.outputs import atomic_path


def write_report(folders, out, fid_name, n_reference, bridge_style=None, targets=()):
    results = Results(folders)
    verdicts, entries = comparisons(results), answer(results)
    rows = verdict_rows(results, verdicts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"fid_vs_nfe.csv": results.table, "fid_vs_nfe_curves.csv": plot_rows(results.table),
              "comparisons.csv": verdicts, "verdicts.csv": rows}
    for name, table in tables.items():
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False)
    with atomic_path(out / "fid_vs_nfe.png") as tmp:
        plot_fid_vs_nfe(results, tmp, fid_name)
    with atomic_path(out / "verdicts.png") as tmp:
        plot_verdicts(rows, tmp, fid_name)
    texts = {"summary.md": summary_markdown(results, entries, [check(results, t) for t in targets], fid_name,
                                            n_reference, bridge_style, verdicts),
             "comparisons.md": comparisons_markdown(results, verdicts, fid_name),
             "headline.json": json.dumps(headline(entries), indent=2) + "\n"}
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    return results.table
