"""Held-out drug prediction and target recovery on the default synthetic screen.

Run by hand (not part of the tests)::

    python benchmarks/heldout_synthetic.py --seeds 0 1 --epochs 60 --out benchmarks/results

Prints, per seed, the summary of ``gim_scvi.tl.evaluate`` on the held-out drugs (GIM next to the
control-mean baseline) and the ground-truth recovery, and writes both to CSV.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd
import scvi

import gim_scvi


def run(seed: int, epochs: int, model_kwargs: dict) -> tuple[pd.DataFrame, dict]:
    scvi.settings.seed = seed
    adata = gim_scvi.data.synthetic(seed=seed)
    gim_scvi.GIM.setup_anndata(
        adata,
        features_key="drug_features",
        control_key="control",
        dose_key="dose",
        perturbation_key="condition",
        cell_line_key="cell_line",
    )
    model = gim_scvi.GIM(adata, **model_kwargs)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs, split_key="split", validation_split="valid", enable_progress_bar=False
    )
    train_s = time.perf_counter() - start
    summary = gim_scvi.tl.summarize(gim_scvi.tl.evaluate(model, adata, heldout="test"))
    summary.insert(0, "seed", seed)
    recovery = gim_scvi.tl.ground_truth_recovery(model, adata) | {
        "seed": seed,
        "train_seconds": round(train_s, 1),
        **{f"pruned_{k}": v for k, v in model.graph_pruning_.items()},
    }
    return summary, recovery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict for gim_scvi.GIM")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries, recoveries = [], []
    for seed in args.seeds:
        summary, recovery = run(seed, args.epochs, json.loads(args.model_kwargs))
        summaries.append(summary)
        recoveries.append(recovery)
    summary = pd.concat(summaries)
    recovery = pd.DataFrame(recoveries)
    cols = [
        "seed",
        "doses",
        "method",
        "r2_all_mean",
        "r2_deg_mean",
        "r2_deg_median",
        "pearson_delta_deg_mean",
        "energy_distance_mean",
    ]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(recovery.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    summary.to_csv(out / "heldout_summary.csv", index=False)
    recovery.to_csv(out / "recovery.csv", index=False)


if __name__ == "__main__":
    main()
