"""`dvc plots diff` that works offline: the same plots, rendered without a CDN.

    python scripts/plots.py [REVISION ...] [-o dvc_plots_offline]

DVC's own HTML loads Vega from a CDN and is blank without network. This asks DVC for the
filled-in Vega-Lite specs (`dvc plots diff --json`, the workspace against HEAD when no
revision is given, or the named commits and experiments against each other) and renders each
with the Vega libraries that the `vl-convert-python` package carries: a PNG and an HTML page
whose scripts are inlined. Needs the `plots` extra: pip install -e '.[plots]'.
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def specs(revisions):
    """{plot name: Vega-Lite spec with its data} of `dvc plots diff --json REVISIONS`."""
    done = subprocess.run(["dvc", "plots", "diff", "--json", *revisions], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"dvc plots diff {' '.join(revisions)} failed: {done.stderr.strip().splitlines()[-1:]}")
    data = json.loads(done.stdout).get("data", {})
    return {name: entry["content"] for name, entries in data.items() for entry in entries if entry["type"] == "vega"}


def file_name(plot):
    """results/verdicts.csv -> results_verdicts (the suffix is replaced by .png and .html)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", plot).strip("_")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revisions", nargs="*", help="commits or experiments (default: the workspace against HEAD)")
    ap.add_argument("-o", "--out", type=Path, default=Path("dvc_plots_offline"))
    args = ap.parse_args()
    try:
        import vl_convert
    except ImportError:
        sys.exit("scripts/plots.py renders with vl-convert-python: pip install -e '.[plots]'")
    found = specs(args.revisions)
    if not found:
        sys.exit("dvc plots diff found no Vega plots: run `dvc repro` first (the report stage writes them)")
    args.out.mkdir(parents=True, exist_ok=True)
    for plot, spec in found.items():
        stem = args.out / file_name(plot)
        stem.with_suffix(".png").write_bytes(vl_convert.vegalite_to_png(spec, scale=2))
        stem.with_suffix(".html").write_text(vl_convert.vegalite_to_html(spec, bundle=True))
        print(f"{plot}: {stem.with_suffix('.png')}, {stem.with_suffix('.html')}")


if __name__ == "__main__":
    main()
