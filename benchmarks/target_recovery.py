"""What limits target recovery on the default synthetic screen: programs, hubs, copies.

Run by hand (not part of the tests)::

    python benchmarks/target_recovery.py --seeds 0 1 --epochs 60
    python benchmarks/target_recovery.py --variants default --seeds 2 3 4

Trains GIM once per variant and seed (the variants differ only in the decoder's loadings and
the priors that decide what a target is; see ``VARIANTS``) and writes, per run, target and
graph recovery (:func:`gim_scvi.tl.ground_truth_recovery`), GIM's mean DEG-R² and Pearson Δ
DEG on the held-out drugs at the highest dose, and three diagnostics of the learned programs:

- ``matched_corr``: mean correlation of the loadings of each true program and its matched
  learned program (the matching that target recovery uses);
- ``matched_density``: mean share of genes loading a matched program with at least 5% of its
  largest loading (the true programs: about 0.19);
- ``targets_off_match``: share of (training drug, program) targets with probability > 0.5 that
  sit on a learned program matched to no true program (a hub or a copy).

Writes ``target_recovery.csv`` (one row per variant and seed).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
from _common import SETUP, print_table

import gim_scvi

# each: (GIM keyword arguments, training-plan keyword arguments)
VARIANTS = {
    "softplus (before)": (
        {"loadings_activation": "softplus", "graph_l1": 1.0, "program_overlap_weight": 0.0},
        {"loadings_lr_factor": 1.0},
    ),
    "softplus, loadings lr x10": (
        {"loadings_activation": "softplus", "graph_l1": 1.0, "program_overlap_weight": 0.0},
        {"loadings_lr_factor": 10.0},
    ),
    "relu, lr x10": (
        {"graph_l1": 1.0, "program_overlap_weight": 0.0},
        {},
    ),
    "relu, lr x10, graph L1 1000": ({"program_overlap_weight": 0.0}, {}),
    "relu, lr x10, graph L1 5000": ({"graph_l1": 5000.0, "program_overlap_weight": 0.0}, {}),
    "default (relu, lr x10, graph L1 1000, overlap 20)": ({}, {}),
    "default, overlap 50, graph L1 2000": (
        {"graph_l1": 2000.0, "program_overlap_weight": 50.0},
        {},
    ),
}


def program_diagnostics(model, adata) -> dict[str, float]:
    """How well the learned programs match the true ones and where the targets sit."""
    truth = adata.uns["ground_truth"]
    true_loadings = truth["loadings"].loc[model._var_names()].to_numpy()
    loadings = model.get_gene_programs().to_numpy()
    match = gim_scvi.tl.match_programs(true_loadings, loadings)
    corr = [
        abs(np.corrcoef(true_loadings[:, k], loadings[:, match[k]])[0, 1])
        for k in range(len(match))
    ]
    matched = loadings[:, match]
    peak = matched.max(0, keepdims=True)
    density = (matched >= 0.05 * np.where(peak > 0, peak, np.inf)).mean(0)
    probs = model.get_intervention_targets(adata=adata).groupby(level="condition").mean()
    split = truth["drugs"]["split"]
    train_drugs = split.index[split == "train"]
    on = probs.loc[probs.index.isin(train_drugs)].to_numpy() > 0.5
    unmatched = np.setdiff1d(np.arange(loadings.shape[1]), match)
    return {
        "matched_corr": float(np.mean(corr)),
        "matched_density": float(density.mean()),
        "targets_off_match": float(on[:, unmatched].sum() / max(on.sum(), 1)),
    }


def run(variant: str, seed: int, epochs: int) -> dict:
    model_kwargs, plan_kwargs = VARIANTS[variant]
    scvi.settings.seed = seed
    adata = gim_scvi.data.synthetic(seed=seed)
    gim_scvi.GIM.setup_anndata(adata, **SETUP)
    model = gim_scvi.GIM(adata, **model_kwargs)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        split_key="split",
        validation_split="valid",
        enable_progress_bar=False,
        plan_kwargs=plan_kwargs or None,
    )
    seconds = time.perf_counter() - start
    scores = gim_scvi.tl.evaluate(model, adata, split_key="split", heldout="test", baselines=())
    top = scores[scores["dose"] == scores["dose"].max()]
    recovery = gim_scvi.tl.ground_truth_recovery(model, adata)
    return {
        "variant": variant,
        "seed": seed,
        "target_auroc": recovery["target_auroc"],
        "target_auprc": recovery["target_auprc"],
        "target_auroc_test": recovery.get("target_auroc_test", np.nan),
        "graph_auroc": recovery["graph_auroc"],
        **program_diagnostics(model, adata),
        "r2_deg": float(top["r2_deg"].mean()),
        "pearson_delta_deg": float(top["pearson_delta_deg"].mean()),
        "train_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS, or 'default'"
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--suffix", default="", help="appended to the CSV file name")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = [next(v for v in VARIANTS if v.startswith(name)) for name in args.variants]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        for seed in args.seeds:
            rows.append(run(name, seed, args.epochs))
            print(rows[-1], flush=True)  # a long run shows its progress
    print_table(pd.DataFrame(rows), out / f"target_recovery{args.suffix}.csv")


if __name__ == "__main__":
    main()
