"""Ridge regression in program space for unseen drugs, next to GIM's generator ensemble.

On a saved model (the same data arguments as ``neighbour_selection.py``)::

    python benchmarks/program_ridge.py --model DIR --data FILE.h5ad --sciplex \
        --tag sciplex_synthetic_30cells_seed0 --refit-seed 0

Each training context (drug x dose x cell line) has a mean exogenous residual, the shift that
the generator ensemble is fitted to (:func:`gim_scvi.model._refit.refit_generator`). Two
questions, one CSV (``program_ridge_<tag>.csv``, one row per method):

1. **How well is a held-out training drug's shift predicted?** The training drugs are split
   into folds (all doses and lines of a drug in one); each fold's shifts are predicted from
   the other folds by (a) nothing (``zero shift``), (b) ridge regressions from the
   standardised features, one per cell line and dose, penalty by leave-one-out
   (``RidgeCV``; ``program ridge``), and (c) the ensemble refitted without the fold, for each
   penalty ladder of ``--ladders`` (``ensemble``). ``cv_loss`` is the cell-weighted squared
   error per program in units of ``sigma_u`` (the refit's own objective, up to terms that do
   not depend on the prediction); ``cv_loss_top_dose`` the same at the highest dose.
2. **What do the validation and test drugs score?** The ensemble (refitted on all training
   contexts with each ladder; the neighbour mixture off), the program ridge fitted on all
   training contexts in place of the ensemble's shift (decoded by GIM as any intervention;
   the nearest training dose's regression at a dose never trained on), their equal blend,
   and the gene-space ridge baseline: mean DEG-R², Pearson of DEG changes and energy
   distance at the highest dose (:func:`gim_scvi.tl.evaluate`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from neighbour_selection import add_data_arguments, load
from sklearn.linear_model import RidgeCV

import gim_scvi
from gim_scvi.model._refit import ContextResiduals, context_residuals, refit_generator

DEFAULT_LADDER = (0.01, 0.1)


def expected_shift(module, contexts: ContextResiduals) -> np.ndarray:
    """The ensemble's expected shift (``mode="mean"``) for each context."""
    with torch.no_grad():
        out = module._generated_intervention(
            module.generator,
            torch.as_tensor(contexts.features, dtype=torch.float32),
            None if contexts.dose is None else torch.as_tensor(contexts.dose, dtype=torch.float32),
            torch.as_tensor(contexts.cell_line, dtype=torch.long),
            "mean",
            None,
        )
    return out["shift"].numpy().astype(np.float64)


def shift_loss(shift: np.ndarray, contexts: ContextResiduals) -> float:
    """Cell-weighted squared error of ``shift`` against the mean residuals, in sigma_u units."""
    error = ((shift - contexts.mean) / contexts.exogenous_sd) ** 2
    return float((contexts.n_cells * error.sum(1)).sum() / contexts.n_cells.sum())


def drug_folds(contexts: ContextResiduals, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each context: its drug's (all doses and lines of a drug in one fold)."""
    _, drug = np.unique(contexts.features, axis=0, return_inverse=True)
    fold_of_drug = np.random.default_rng(seed).permutation(drug.max() + 1) % n_folds
    return fold_of_drug[drug.reshape(-1)]


def cv_shifts(module, contexts: ContextResiduals, ladder, folds: np.ndarray, refit_seed: int):
    """Each context's expected shift from the ensemble refitted without its fold."""
    shift = np.zeros_like(contexts.mean)
    for k in np.unique(folds):
        held = np.flatnonzero(folds == k)
        train = contexts.take(folds != k)
        refit_generator(module, train, weight_decay=ladder, seed=refit_seed)
        shift[held] = expected_shift(module, contexts.take(held))
    return shift


def standardised(module, features: np.ndarray) -> np.ndarray:
    """Features as the generator reads them."""
    with torch.no_grad():
        x = module.standardise_features(torch.as_tensor(features, dtype=torch.float32))
    return x.numpy().astype(np.float64)


def line_dose_groups(contexts: ContextResiduals) -> dict:
    """Rows of each (cell-line code, dose) among the contexts."""
    dose = np.zeros(len(contexts.n_cells)) if contexts.dose is None else contexts.dose[:, 0]
    frame = pd.DataFrame({"line": contexts.cell_line[:, 0], "dose": dose})
    return {
        (int(k[0]), float(k[1])): v for k, v in frame.groupby(["line", "dose"]).indices.items()
    }


def fit_ridge(x: np.ndarray, contexts: ContextResiduals, rows: np.ndarray) -> RidgeCV:
    """Ridge from features to the mean residuals of ``rows``, weighted by cells."""
    return RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(
        x[rows], contexts.mean[rows], sample_weight=contexts.n_cells[rows]
    )


def ridge_cv_shifts(module, contexts: ContextResiduals, folds: np.ndarray) -> np.ndarray:
    """Each context's shift by the program ridge of its line and dose, fold by fold."""
    x = standardised(module, contexts.features)
    shift = np.zeros_like(contexts.mean)
    for rows in line_dose_groups(contexts).values():
        for k in np.unique(folds[rows]):
            fit, held = rows[folds[rows] != k], rows[folds[rows] == k]
            shift[held] = fit_ridge(x, contexts, fit).predict(x[held])
    return shift


@contextlib.contextmanager
def program_ridge_shift(module, contexts: ContextResiduals, blend: float):
    """Within the block, the ensemble's shift is ``blend`` x the program ridge's + the rest."""
    x = standardised(module, contexts.features)
    ridges = {
        key: fit_ridge(x, contexts, rows) for key, rows in line_dose_groups(contexts).items()
    }
    doses = np.unique([key[1] for key in ridges])
    generated = module._generated_intervention

    def with_ridge(net, features, dose, cell_line, *args, **kwargs):
        out = generated(net, features, dose, cell_line, *args, **kwargs)
        if net is not module.generator:
            return out
        xs = standardised(module, features.cpu().numpy())
        row_doses = np.zeros(len(xs)) if dose is None else dose[:, 0].cpu().numpy()
        nearest = doses[np.abs(np.log(doses)[None] - np.log(row_doses)[:, None]).argmin(1)]
        shift = np.stack(
            [
                ridges[(int(line), float(d))].predict(row[None])[0]
                for row, line, d in zip(xs, cell_line[:, 0].tolist(), nearest, strict=True)
            ]
        )
        ridge = torch.as_tensor(shift, dtype=out["shift"].dtype, device=out["shift"].device)
        return out | {"shift": blend * ridge + (1 - blend) * out["shift"]}

    module._generated_intervention = with_ridge
    try:
        yield
    finally:
        del module._generated_intervention


def losses(shift: np.ndarray, contexts: ContextResiduals, top: np.ndarray) -> dict[str, float]:
    """:func:`shift_loss` over all contexts and over those at the highest dose."""
    return {
        "cv_loss": shift_loss(shift, contexts),
        "cv_loss_top_dose": shift_loss(shift[top], contexts.take(top)),
    }


def scores(model, adata, kwargs: dict, baselines=()) -> list[dict]:
    """Mean DEG-R², Pearson of DEG changes and energy distance at the highest dose."""
    out = []
    for heldout in ("valid", kwargs["heldout"]):
        table = gim_scvi.tl.evaluate(
            model, adata, **(kwargs | {"heldout": heldout}), baselines=baselines
        )
        top = table[table["dose"] == table["dose"].max()]
        means = top.groupby("method")[["r2_deg", "pearson_delta_deg", "energy_distance"]].mean()
        for method, values in means.iterrows():
            out.append({"method": method, "set": "test" if heldout != "valid" else "valid"})
            out[-1] |= values.to_dict()
    return out


def wide(rows: list[dict], method: str) -> dict:
    """One method's scores on the validation and test drugs, as one row."""
    return {
        f"{row['set']}_{key}": value
        for row in rows
        if row["method"] == method
        for key, value in row.items()
        if key not in ("method", "set")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds")
    parser.add_argument("--refit-seed", type=int, default=0, help="the model's training seed")
    parser.add_argument(
        "--ladders",
        default="0.01:0.1",
        help="ensemble penalty ladders low:high, comma-separated; the default is train's",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adata, model, kwargs = load(args)
    module = model.module
    module.neighbour_weight.fill_(0.0)
    split = adata.obs[kwargs["split_key"]].astype(str).to_numpy()
    contexts = context_residuals(model, np.flatnonzero(split == "train"))
    folds = drug_folds(contexts, args.n_folds, args.seed)
    top = (
        np.ones(len(folds), bool)
        if contexts.dose is None
        else contexts.dose[:, 0] == contexts.dose.max()
    )
    rows = [{"method": "zero shift"} | losses(np.zeros_like(contexts.mean), contexts, top)]
    ridge_loss = losses(ridge_cv_shifts(module, contexts, folds), contexts, top)
    ladders = [tuple(float(v) for v in item.split(":")) for item in args.ladders.split(",")]
    for ladder in [*[lad for lad in ladders if lad != DEFAULT_LADDER], DEFAULT_LADDER]:
        start = time.perf_counter()
        row = {"method": "ensemble", "low": ladder[0], "high": ladder[1]}
        row |= losses(cv_shifts(module, contexts, ladder, folds, args.refit_seed), contexts, top)
        refit_generator(module, contexts, weight_decay=ladder, seed=args.refit_seed)
        scored = scores(model, adata, kwargs, ("ridge",) if ladder == DEFAULT_LADDER else ())
        rows.append(row | wide(scored, "GIM") | {"seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    # the ensemble is now the default ladder's
    rows.append({"method": "gene ridge (baseline)"} | wide(scored, "ridge"))
    for blend, name in ((1.0, "program ridge"), (0.5, "blend of ensemble and program ridge")):
        with program_ridge_shift(module, contexts, blend):
            scored = scores(model, adata, kwargs)
        rows.append({"method": name} | (ridge_loss if blend == 1.0 else {}) | wide(scored, "GIM"))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(Path(args.out) / f"program_ridge_{args.tag}.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
