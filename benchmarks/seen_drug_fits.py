"""Drugs seen in training at a dose never seen: the joint generator against per-drug fits.

Run by hand (not part of the tests)::

    python benchmarks/seen_drug_fits.py --seeds 0 1 --epochs 60

Trains GIM on the default synthetic screen with one dose (1000 nM) held out in every drug (or
loads ``--model-dir/model_s{seed}`` if present), then predicts the held-out dose four ways:
with the jointly trained generator alone (GIM before session 7); with its targets but each
drug's own shift sizes and dose response per cell line fitted on the drug's training cells
(:func:`gim_scvi.model._refit.refit_seen_perturbations`, what ``train`` does now); and with
each drug's whole intervention fitted that way (``benchmarks/latent_neighbours.py``:
``sparse`` under the model's target prior, ``dense`` without it). The fitted dose responses
interpolate to the unseen dose. Also scores target recovery of each (every drug is seen in
this split). Writes ``seen_drug_fits.csv``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
from _common import SETUP
from latent_neighbours import drug_intervention, fit_drug_interventions, replacing_rows

import gim_scvi
from gim_scvi.model._refit import context_residuals, refit_seen_perturbations


def seen_drugs_from(module, fitted):
    """Within the block, a row with a fitted drug's features gets that drug's intervention."""

    def own(out, features, dose, cell_line, mode):
        return drug_intervention(module, fitted, fitted.index(features), cell_line, dose, mode)

    return replacing_rows(module, lambda features: fitted.index(features) >= 0, own)


def run(seed: int, epochs: int, model_dir: Path) -> pd.DataFrame:
    scvi.settings.seed = seed
    adata = gim_scvi.data.synthetic(seed=seed)
    gim_scvi.GIM.setup_anndata(adata, **SETUP)
    gim_scvi.data.dose_holdout_split(adata, dose=1000.0, key_added="split_dose")
    path = model_dir / f"model_s{seed}"
    if path.exists():
        model = gim_scvi.GIM.load(str(path), adata=adata)
    else:
        model = gim_scvi.GIM(adata)
        model.train(max_epochs=epochs, split_key="split_dose", enable_progress_bar=False)
        model.save(str(path), overwrite=True)
    kwargs = dict(split_key="split_dose", heldout="test")
    train = np.flatnonzero(adata.obs["split_dose"].to_numpy() == "train")
    contexts = context_residuals(model, train)
    rows = []

    def score(name, baselines=()):
        results = gim_scvi.tl.evaluate(model, adata, baselines=baselines, **kwargs)
        recovery = gim_scvi.tl.ground_truth_recovery(model, adata)
        for method, frame in results.groupby("method", sort=False):
            gim = method == "GIM"
            rows.append(
                {
                    "seed": seed,
                    "method": name if gim else method,
                    "r2_deg_mean": frame["r2_deg"].mean(),
                    "r2_deg_median": frame["r2_deg"].median(),
                    "pearson_delta_deg_mean": frame["pearson_delta_deg"].mean(),
                    "energy_distance_mean": frame["energy_distance"].mean(),
                    "target_auroc": recovery["target_auroc"] if gim else np.nan,
                    "target_auprc": recovery["target_auprc"] if gim else np.nan,
                }
            )

    module = model.module
    module.seen_fitted.zero_()  # the jointly trained generator alone
    score("GIM, joint generator only", baselines=("nearest_dose", "ridge", "mean_shift"))
    refit_seen_perturbations(module, contexts, seed=seed)  # what `train` does since session 7
    score("GIM, default (per-drug sizes and dose response)")
    module.seen_fitted.zero_()
    for kind in ("sparse", "dense"):
        fitted = fit_drug_interventions(model.module, contexts, dense=kind == "dense")
        with seen_drugs_from(model.module, fitted):
            score(f"GIM, per-drug fits ({kind})")
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--model-dir", default="seen_drug_models", help="models saved/loaded")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    table = pd.concat([run(seed, args.epochs, model_dir) for seed in args.seeds])
    print(table.to_string(index=False, float_format="%.3f"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "seen_drug_fits.csv", index=False)


if __name__ == "__main__":
    main()
