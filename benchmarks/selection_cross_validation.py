"""Would training drugs held out fold by fold choose the neighbour mixture better?

The neighbour mixture (:meth:`gim_scvi.GIM.select_neighbour_mixture`) is chosen on a few
validation drugs (10 on sci-Plex, 4 on the default synthetic screen). This scores every
(weight, temperature) candidate also on the *training* drugs, fold by fold, as if each fold had
not been trained on: the fold's drugs are removed from the seen perturbations (so they get the
ensemble's and their neighbours' intervention, never their own fit, and never serve as a
neighbour) and the generator ensemble is refitted on the other drugs' contexts. The joint
stage (latent space, graph, the other drugs' fits) is the one trained on all of them. Scored
at the highest dose, per condition, as the selection does; the validation and test drugs are
scored too, so that a choice made on validation + folds can be compared with the current one.
Same arguments as ``neighbour_selection.py``::

    python benchmarks/selection_cross_validation.py --model DIR --synthetic-seed 0 \
        --tag synthetic_s0 --refit-seen 0

Writes ``selection_cross_validation_<tag>.csv`` (one row per candidate and condition).
``--choose CSV [CSV ...]`` instead reads such files and prints what each rule would choose and
its test score: the current rule (mean DEG-R² on the validation drugs, smallest weight within
one standard error of the best) and the same on the folds, or on both, with DEG-R² as is or
clipped at 0.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from neighbour_selection import add_data_arguments, load

import gim_scvi
from gim_scvi.model._refit import context_residuals, refit_generator, refit_seen_perturbations
from gim_scvi.module._module import SEEN_BUFFERS

CANDIDATES = [(0.0, 0.005)] + [(w, t) for w in (0.5, 1.0) for t in (0.005, 0.02, 0.1)]


def score_candidates(model, adata, split_key: str, heldout: str, label: str) -> list[dict]:
    """Per-condition DEG-R² at the highest dose of every candidate on ``heldout`` cells."""
    module = model.module
    rows = []
    for weight, temperature in CANDIDATES:
        module.neighbour_weight.fill_(weight)
        module.neighbour_temperature.fill_(temperature)
        scores = gim_scvi.tl.evaluate(
            model,
            adata,
            split_key=split_key,
            heldout=heldout,
            baselines=(),
            n_pcs=20,
            degs="pooled_doses" if module.has_dose else "condition",
        )
        top = scores[scores["dose"] == scores["dose"].max()]
        rows += [
            {
                "set": label,
                "weight": weight,
                "temperature": temperature,
                "condition": row.condition,
                "cell_line": row.cell_line,
                "r2_deg": row.r2_deg,
            }
            for row in top.itertuples()
        ]
    return rows


def matching(rows: np.ndarray, of: np.ndarray) -> np.ndarray:
    """Which of ``rows`` equal one of the rows ``of``."""
    distance = torch.cdist(torch.as_tensor(rows).float(), torch.as_tensor(of).float())
    return (distance.min(1).values < 1e-6).numpy()


def fold_cells(adata, in_fold: np.ndarray, train: np.ndarray, control: np.ndarray, scored_dose):
    """The controls, the fold's cells at the scored dose and 2,000 other training cells.

    ``scored_dose`` is a boolean mask of the cells at the highest dose (``None``: no dose).
    """
    scored = in_fold if scored_dose is None else in_fold & scored_dose
    others = np.flatnonzero(train & ~in_fold & ~control)
    sample = np.random.default_rng(0).choice(others, min(2000, len(others)), replace=False)
    cells = np.union1d(np.flatnonzero(control | scored), sample)
    sub = adata[cells].copy()
    sub.obs["cv_split"] = np.where(in_fold[cells], "fold", "train")
    return sub


def choose(table: pd.DataFrame, clip: bool, by_drug: bool = False) -> tuple[float, float]:
    """The smallest weight within one SE of the best mean DEG-R² (the selection's rule).

    With ``by_drug`` the standard error treats each perturbation (all its cell lines) as one
    observation instead of each condition.
    """
    values = table["r2_deg"].clip(lower=0) if clip else table["r2_deg"]
    scores = table.assign(value=values).pivot_table(
        index=["set", "condition", "cell_line"], columns=["weight", "temperature"], values="value"
    )
    means = scores.mean()
    gaps = scores[means.idxmax()].to_numpy()[:, None] - scores.to_numpy()
    units = pd.DataFrame(gaps).groupby(scores.index.droplevel("cell_line")).mean().to_numpy()
    units = units if by_drug else gaps
    se = units.std(0, ddof=1) / np.sqrt(len(units))
    within = [c for c, g, e in zip(scores.columns, gaps.mean(0), se, strict=True) if g <= e]
    return min(within, key=lambda c: (c[0], -means[c]))


def print_choices(paths: list[str]) -> None:
    """For each results file, the test DEG-R² of the candidate each rule chooses."""
    rows = []
    for path in paths:
        table = pd.read_csv(path)
        test = table[~table["set"].isin(["cv", "valid"])]
        test_means = test.groupby(["weight", "temperature"])["r2_deg"].mean()
        row = {"data": table["data"].iloc[0], "best in hindsight": test_means.max()}
        row["ensemble alone"] = test_means[(0.0, test_means.loc[0.0].index[0])]
        for sets in (("valid",), ("cv",), ("valid", "cv")):
            if not set(sets) <= set(table["set"]):  # scored without folds
                continue
            for clip, by_drug in ((False, False), (True, False), (False, True)):
                chosen = choose(table[table["set"].isin(sets)], clip, by_drug)
                name = (
                    "+".join(sets) + (" clipped" if clip else "") + (" SE/drug" if by_drug else "")
                )
                row[name] = f"{test_means[chosen]:.3f} ({chosen[0]:g}, {chosen[1]:g})"
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, required=False)  # not with --choose
    parser.add_argument("--refit-seen", type=int, default=None, metavar="SEED")
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--choose", nargs="+", metavar="CSV", help="summarise results files")
    args = parser.parse_args()
    if args.choose:
        print_choices(args.choose)
        return
    if args.model is None or args.tag is None:
        parser.error("--model and --tag are required (unless --choose)")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    adata, model, kwargs = load(args)
    module = model.module
    split_key = kwargs["split_key"]
    split = adata.obs[split_key].astype(str).to_numpy()
    train = split == "train"
    contexts = context_residuals(model, np.flatnonzero(train))
    if args.refit_seen is not None:
        refit_seen_perturbations(module, contexts, seed=args.refit_seen)
    seed = args.refit_seen or 0
    state = copy.deepcopy(module.state_dict())
    features = model._features(adata)
    control = model._control_mask(adata)
    drugs = np.unique(features.inverse[train & ~control])
    rng = np.random.default_rng(0)
    folds = np.arange(len(drugs)) % max(args.n_folds, 1)  # --n-folds 0: valid and test only
    fold_of = dict(zip(rng.permutation(drugs), folds, strict=True))
    dose = model._doses(adata)
    at_top_dose = None if dose is None else dose == dose[train & ~control].max()
    rows, start = [], time.perf_counter()
    for fold in range(args.n_folds):
        module.load_state_dict(state)
        fold_ids = [d for d, f in fold_of.items() if f == fold]
        fold_rows = features.unique[fold_ids]
        in_fold = train & ~control & np.isin(features.inverse, fold_ids)
        keep = ~matching(contexts.features, fold_rows)
        others = contexts.take(keep)
        refit_generator(module, others, seed=seed)
        unseen = torch.as_tensor(matching(module.seen_features.numpy(), fold_rows))
        for name in SEEN_BUFFERS:
            setattr(module, name, getattr(module, name)[~unseen])
        sub = fold_cells(adata, in_fold, train, control, at_top_dose)
        rows += score_candidates(model, sub, "cv_split", "fold", "cv")
        print(f"fold {fold}: {len(fold_rows)} drugs, {time.perf_counter() - start:.0f} s")
    module.load_state_dict(state)
    for label in ("valid", kwargs["heldout"]):
        rows += score_candidates(model, adata, split_key, label, label)
    table = pd.DataFrame(rows).assign(data=args.tag)
    summary = table.assign(clipped=table["r2_deg"].clip(lower=0))
    summary = summary.groupby(["set", "weight", "temperature"])[["r2_deg", "clipped"]].mean()
    print(summary.unstack("set").round(3).to_string())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"selection_cross_validation_{args.tag}.csv", index=False)


if __name__ == "__main__":
    main()
