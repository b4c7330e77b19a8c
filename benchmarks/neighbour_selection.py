"""The neighbour mixture chosen on validation drugs, scored on the held-out test drugs.

Runs on a saved model and the AnnData it was trained on (whose split has whole validation
drugs that were not trained on)::

    python benchmarks/neighbour_selection.py --model DIR --synthetic-seed 0 --tag synthetic_s0
    python benchmarks/neighbour_selection.py --model DIR --data FILE.h5ad --sciplex \
        --tag sciplex_synthetic_30cells

:meth:`gim_scvi.GIM.select_neighbour_mixture` scores each (weight, temperature) on the
validation drugs; every candidate is also scored on the test drugs (never used for the choice)
next to the baselines, so that the table shows what the choice gained or lost against the
ensemble alone (weight 0) and against the best candidate in hindsight. Writes
``neighbour_selection_<tag>.csv``.

``--refit-seen SEED`` first fits the training perturbations' own interventions again with the
current code (:func:`gim_scvi.model._refit.refit_seen_perturbations`, with the seed the model
was trained with): on a model saved by an older version this gives what a training with the
current version would (the fits are the last step of the second stage that they depend on).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch

import gim_scvi
from gim_scvi.model._refit import context_residuals, refit_seen_perturbations

BASELINES = ("nearest_drug", "ridge")


def load(args: argparse.Namespace):
    """The AnnData (registered), the model, and the evaluation keyword arguments."""
    if args.sciplex:
        scvi.settings.seed = 0
        adata = gim_scvi.data.read_sciplex3(args.data)
        gim_scvi.pp.featurize_smiles(
            adata, "smiles", method=args.features, n_bits=1024, control_key="control"
        )
        if "split_ood" not in adata.obs:
            gim_scvi.data.sciplex3_ood_split(adata)
        counts = str(adata.uns["sciplex3"]["counts"])
        layer = counts.split("/", 1)[1] if counts.startswith("layers/") else None
        gim_scvi.GIM.setup_anndata(
            adata,
            features_key="drug_features",
            control_key="control",
            dose_key="dose_nM",
            perturbation_key="condition",
            cell_line_key="cell_line",
            layer=layer,
        )
        kwargs = dict(split_key="split_ood", heldout="ood", degs="pooled_doses")
    else:
        data_kwargs = json.loads(args.data_kwargs)
        adata = gim_scvi.data.synthetic(seed=args.synthetic_seed, **data_kwargs)
        kwargs = dict(split_key="split", heldout="test")
    return adata, gim_scvi.GIM.load(args.model, adata=adata), kwargs


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The saved model, its data (a sci-Plex file or a synthetic seed) and where to write."""
    parser.add_argument("--model", required=required, help="saved GIM folder")
    parser.add_argument("--data", help="sci-Plex-schema .h5ad (with --sciplex)")
    parser.add_argument("--sciplex", action="store_true", help="read --data as sci-Plex 3")
    parser.add_argument(
        "--features",
        choices=["morgan", "descriptors", "both"],
        default="morgan",
        help="the features the model was trained on (with --sciplex; gim-scvi train's "
        "default was morgan until session 22, both since)",
    )
    parser.add_argument("--synthetic-seed", type=int, default=0)
    parser.add_argument("--data-kwargs", default="{}", help="JSON dict for synthetic()")
    parser.add_argument("--tag", required=required, help="appended to the CSV file name")
    parser.add_argument("--out", default="benchmarks/results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument(
        "--refit-seen", type=int, default=None, metavar="SEED", help="refit seen fits first"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adata, model, kwargs = load(args)
    module = model.module
    if args.refit_seen is not None:
        split = adata.obs[kwargs["split_key"]].astype(str).to_numpy()
        contexts = context_residuals(model, np.flatnonzero(split == "train"))
        refit_seen_perturbations(module, contexts, seed=args.refit_seen)
    start = time.perf_counter()
    selection = model.select_neighbour_mixture(
        split_key=kwargs["split_key"], validation_split="valid"
    )
    print(f"selection: {time.perf_counter() - start:.1f} s")
    chosen = selection.loc[selection["chosen"]].iloc[0]
    rows = []
    for i, candidate in selection.iterrows():
        module.neighbour_weight.fill_(candidate["weight"])
        module.neighbour_temperature.fill_(candidate["temperature"])
        scores = gim_scvi.tl.evaluate(
            model, adata, baselines=BASELINES if i == 0 else (), **kwargs
        )
        top = scores[scores["dose"] == scores["dose"].max()]
        means = top.groupby("method")[["r2_deg", "pearson_delta_deg", "energy_distance"]].mean()
        for method, values in means.iterrows():
            name = (
                method
                if method != "GIM"
                else f"GIM w={candidate['weight']:g} tau={candidate['temperature']:g}"
            )
            rows.append(
                {
                    "data": args.tag,
                    "method": name,
                    "chosen": bool(candidate["chosen"]) and method == "GIM",
                    "valid_r2_deg": candidate["r2_deg"] if method == "GIM" else np.nan,
                    "valid_gap": candidate["gap"] if method == "GIM" else np.nan,
                    "valid_gap_se": candidate["gap_se"] if method == "GIM" else np.nan,
                    "test_r2_deg": values["r2_deg"],
                    "test_pearson_delta_deg": values["pearson_delta_deg"],
                    "test_energy_distance": values["energy_distance"],
                }
            )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.3f"))
    print("chosen:", dict(chosen))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"neighbour_selection_{args.tag}.csv", index=False)


if __name__ == "__main__":
    main()
