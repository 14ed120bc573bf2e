"""Seconds per sample at each NFE, from the evaluation's own timing (results/fid_vs_nfe.csv).

The evaluate stage times sampling alone, per worker (1 thread), for every
(model, sampler, nfe). This prints that table and the ratio to the same
sampler's 1-NFE cost, so the cost of an NFE can be read off directly.

    python bench/sec_per_sample.py [results/fid_vs_nfe.csv]
"""
import sys

import pandas as pd


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "results/fid_vs_nfe.csv"
    table = pd.read_csv(path)
    table["ms_per_sample"] = 1000 * table["sec_per_sample"]
    wide = table.pivot_table(index=["model", "sampler"], columns="nfe", values="ms_per_sample")
    print("ms per sample (1 worker, 1 thread), by NFE:")
    print(wide.round(2).to_string())
    per_nfe = (table["ms_per_sample"] / table["nfe"]).groupby(table["model"]).median()
    print("\nmedian ms per network evaluation per sample:")
    print(per_nfe.round(3).to_string())


if __name__ == "__main__":
    main()
