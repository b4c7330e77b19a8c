"""Held-out drug prediction and target recovery on the default synthetic screen.

Run by hand (not part of the tests)::

    python benchmarks/heldout_synthetic.py --seeds 0 1 --epochs 60 --out benchmarks/results

Prints, per seed, the summary of ``gim_scvi.tl.evaluate`` on the held-out drugs (GIM next to
every baseline) and the ground-truth recovery, and writes both to CSV. ``--split dose`` instead
trains on every drug with one dose (``--dose``, default 1000 nM) held out everywhere, and adds
the ``nearest_dose`` baseline; ``--compare-joint`` also scores each trained model with the
generator trained jointly with it instead of the ensemble (``GIM_joint_generator``), and
``--combinations N`` also scores N pairs of training drugs given together (``additive``
baseline), ``--save-models DIR`` keeps each trained model. ``--data-kwargs`` changes the
simulation (e.g. ``'{"n_drugs": 96, "n_heldout_drugs": 24}'``). GIM minus each baseline,
with intervals from resampling the held-out drugs (:func:`gim_scvi.tl.compare`), is written
to ``heldout_compare*.csv``::

    python benchmarks/heldout_synthetic.py --split dose --seeds 0 1 --epochs 60
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

BASELINES = ("control_mean", "mean_shift", "nearest_drug", "ridge")
COMPARED_METRICS = ("r2_deg", "pearson_delta_deg")


def run(
    seed: int,
    epochs: int,
    model_kwargs: dict,
    split: str = "drug",
    dose: float = 1000.0,
    train_kwargs: dict | None = None,
    compare_joint: bool = False,
    combinations: int = 0,
    data_kwargs: dict | None = None,
    save_dir: Path | None = None,
) -> tuple[pd.DataFrame, dict, pd.DataFrame | None, pd.DataFrame]:
    scvi.settings.seed = seed
    # pairs of training drugs (split "combo") leave the single-drug cells and training as is
    adata = gim_scvi.data.synthetic(seed=seed, n_combinations=combinations, **(data_kwargs or {}))
    gim_scvi.GIM.setup_anndata(
        adata,
        features_key="drug_features",
        control_key="control",
        dose_key="dose",
        perturbation_key="condition",
        cell_line_key="cell_line",
    )
    split_key, validation, baselines = "split", "valid", BASELINES
    if split == "dose":  # every drug seen, one dose never seen: held out in every drug
        gim_scvi.data.dose_holdout_split(adata, dose=dose, key_added="split_dose")
        split_key, validation = "split_dose", None
        baselines = (*BASELINES, "nearest_dose")
    model = gim_scvi.GIM(adata, **model_kwargs)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        split_key=split_key,
        validation_split=validation,
        enable_progress_bar=False,
        **(train_kwargs or {}),
    )
    train_s = time.perf_counter() - start
    if save_dir is not None:  # to score the same model again later (e.g. new metrics)
        model.save(save_dir / f"model_{split}_s{seed}", overwrite=True)
    scores = gim_scvi.tl.evaluate(
        model, adata, split_key=split_key, heldout="test", baselines=baselines
    )
    if compare_joint and model.module.generator is not None:
        # the same trained model, predicting with the generator trained jointly with it
        model.module.ensemble_fitted.fill_(False)
        joint = gim_scvi.tl.evaluate(
            model, adata, split_key=split_key, heldout="test", baselines=()
        )
        model.module.ensemble_fitted.fill_(True)
        scores = pd.concat([scores, joint.assign(method="GIM_joint_generator")])
    summary = gim_scvi.tl.summarize(scores)
    summary.insert(0, "seed", seed)
    # GIM minus each other method, with intervals from resampling the held-out drugs
    comparison = pd.concat(
        [gim_scvi.tl.compare(scores, metric=m).assign(metric=m) for m in COMPARED_METRICS]
    )
    comparison.insert(0, "seed", seed)
    combo = None
    if combinations:
        combo = gim_scvi.tl.summarize(
            gim_scvi.tl.evaluate(model, adata, split_key="split", heldout="combo")
        )
        combo.insert(0, "seed", seed)
    recovery = gim_scvi.tl.ground_truth_recovery(model, adata) | {
        "seed": seed,
        "train_seconds": round(train_s, 1),
        **{f"pruned_{k}": v for k, v in model.graph_pruning_.items()},
    }
    return summary, recovery, combo, comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict for gim_scvi.GIM")
    parser.add_argument("--train-kwargs", default="{}", help="JSON dict for GIM.train")
    parser.add_argument(
        "--data-kwargs",
        default="{}",
        help="JSON dict for gim_scvi.data.synthetic (e.g. more drugs and held-out drugs)",
    )
    parser.add_argument("--suffix", default="", help="appended to the CSV file names")
    parser.add_argument(
        "--split", choices=["drug", "dose"], default="drug", help="hold out drugs or one dose"
    )
    parser.add_argument("--dose", type=float, default=1000.0, help="held-out dose (--split dose)")
    parser.add_argument(
        "--compare-joint",
        action="store_true",
        help="also score the same model with its jointly trained generator (no ensemble)",
    )
    parser.add_argument(
        "--combinations",
        type=int,
        default=0,
        help="also score this many pairs of training drugs given together (--split drug)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--save-models", type=Path, help="folder to save each trained model in")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.combinations and args.split != "drug":
        parser.error("--combinations needs --split drug")
    summaries, recoveries, combos, comparisons = [], [], [], []
    for seed in args.seeds:
        summary, recovery, combo, comparison = run(
            seed,
            args.epochs,
            json.loads(args.model_kwargs),
            args.split,
            args.dose,
            json.loads(args.train_kwargs),
            args.compare_joint,
            args.combinations,
            json.loads(args.data_kwargs),
            args.save_models,
        )
        comparisons.append(comparison)
        summaries.append(summary)
        recoveries.append(recovery)
        combos.append(combo)
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
    suffix = ("" if args.split == "drug" else "_dose") + args.suffix
    summary.to_csv(out / f"heldout_summary{suffix}.csv", index=False)
    recovery.to_csv(out / f"recovery{suffix}.csv", index=False)
    comparison = pd.concat(comparisons)
    print(
        comparison[["seed", "metric", "method", "difference", "ci_low", "ci_high"]].to_string(
            index=False, float_format=lambda v: f"{v:+.3f}"
        )
    )
    comparison.to_csv(out / f"heldout_compare{suffix}.csv", index=False)
    if args.combinations:
        combo = pd.concat(combos)
        print(combo[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        combo.to_csv(out / f"heldout_summary_combo{suffix}.csv", index=False)


if __name__ == "__main__":
    main()
