"""Choosing, on validation perturbations, how much unseen ones borrow from similar seen ones."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from gim_scvi.model._features import feature_rows

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (0.0, 0.5, 1.0)
DEFAULT_TEMPERATURES = (0.005, 0.02, 0.1)


def unseen_validation_cells(
    model,
    adata: AnnData,
    split_key: str,
    validation_split: str,
    control: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the perturbed ``validation_split`` cells whose perturbation was not trained on.

    Only the validation cells' features are read (distinct rows of a few thousand cells, not
    of the whole screen). ``control`` is :meth:`GIM._control_mask` of ``adata`` if known.
    """
    split = adata.obs[split_key].astype(str).to_numpy()
    control = model._control_mask(adata) if control is None else control
    cells = np.flatnonzero((split == validation_split) & ~control)
    if len(cells) == 0:
        return cells
    features = adata.obsm[model._setup_arg("features_key")]
    features = features.iloc[cells] if isinstance(features, pd.DataFrame) else features[cells]
    rows = feature_rows(features)
    with torch.no_grad():
        seen = model.module.seen_rows(torch.as_tensor(rows.unique, dtype=torch.float32))
    return cells[~seen.cpu().numpy()[rows.inverse]]


def scoring_cells(
    adata: AnnData,
    split_key: str,
    validation_split: str,
    train_split: str,
    control: np.ndarray,
    seed: int,
    n_train: int = 2000,
) -> np.ndarray:
    """Indices of the control and validation cells and of up to ``n_train`` training cells."""
    split = adata.obs[split_key].astype(str).to_numpy()
    train = np.flatnonzero((split == train_split) & ~control)
    rng = np.random.default_rng(seed)
    sample = rng.choice(train, size=min(n_train, len(train)), replace=False)
    return np.union1d(np.flatnonzero(control | (split == validation_split)), sample)


def select_neighbour_mixture(
    model,
    adata: AnnData | None = None,
    split_key: str | None = None,
    validation_split: str | None = None,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    n_cells: int = 200,
    seed: int = 0,
    scorer: _ValidationScorer | None = None,
) -> pd.DataFrame:
    """Score each (weight, temperature) on the validation perturbations and keep one.

    See :meth:`gim_scvi.GIM.select_neighbour_mixture`. A ``scorer`` already built (by
    :func:`validation_scorer`) replaces ``adata``, ``split_key``, ``validation_split``,
    ``n_cells`` and ``seed``.
    """
    _check_fitted_ensemble(model)
    weights = _checked_grid(weights, "weights", lower=0.0, upper=1.0)
    temperatures = _checked_grid(temperatures, "temperatures", lower=None, upper=None)
    if 0.0 not in weights:
        raise ValueError(
            f"`weights` must include 0 (the generator ensemble alone), got {weights}."
        )
    module = model.module
    if scorer is None:
        scorer = validation_scorer(model, adata, split_key, validation_split, n_cells, seed)
    before = (float(module.neighbour_weight), float(module.neighbour_temperature))
    candidates = [(0.0, temperatures[0])] + [
        (w, t) for w in weights if w > 0 for t in temperatures
    ]
    rows, per_condition = [], []
    try:
        for weight, temperature in candidates:
            module.neighbour_weight.fill_(weight)
            module.neighbour_temperature.fill_(temperature)
            row, scores = scorer.score()
            rows.append({"weight": weight, "temperature": temperature, **row})
            per_condition.append(scores)
    except BaseException:
        module.neighbour_weight.fill_(before[0])
        module.neighbour_temperature.fill_(before[1])
        raise
    table = pd.DataFrame(rows)
    table["gap"], table["gap_se"] = _gaps_to_best(per_condition, table["r2_deg"].to_numpy())
    within = table[table["gap"] <= table["gap_se"]]  # the best one is always within
    order = within.sort_values(["weight", "r2_deg"], ascending=[True, False], kind="stable")
    best = order.index[0]
    table["chosen"] = table.index == best
    chosen = table.loc[best]
    module.neighbour_weight.fill_(float(chosen["weight"]))
    module.neighbour_temperature.fill_(float(chosen["temperature"]))
    logger.info(
        "Neighbour mixture chosen on %d validation conditions: weight %.2f, temperature %g "
        "(DEG-R² %.3f; ensemble alone %.3f).",
        int(chosen["n_conditions"]),
        chosen["weight"],
        chosen["temperature"],
        chosen["r2_deg"],
        table.loc[0, "r2_deg"],
    )
    return table


def select_ensemble_members(
    model,
    adata: AnnData | None = None,
    split_key: str | None = None,
    validation_split: str | None = None,
    n_cells: int = 200,
    seed: int = 0,
    scorer: _ValidationScorer | None = None,
) -> pd.DataFrame:
    """Score each kind of ensemble member, and all together, on the validation perturbations.

    See :meth:`gim_scvi.GIM.select_ensemble_members`. A ``scorer`` already built (by
    :func:`validation_scorer`) replaces ``adata``, ``split_key``, ``validation_split``,
    ``n_cells`` and ``seed``.
    """
    _check_fitted_ensemble(model)
    module = model.module
    ensemble = module.generator
    candidates = [(kind,) for kind in ensemble.kinds]
    if len(ensemble.kinds) > 1:
        candidates.append(ensemble.kinds)
    if scorer is None:
        scorer = validation_scorer(model, adata, split_key, validation_split, n_cells, seed)
    before = (ensemble.active_kinds, float(module.neighbour_weight))
    rows, per_condition = [], []
    try:
        module.neighbour_weight.fill_(0.0)  # the ensemble alone
        for kinds in candidates:
            ensemble.set_active_kinds(kinds)
            row, scores = scorer.score()
            rows.append({"member_layers": "+".join(map(str, kinds)), **row})
            per_condition.append(scores)
    except BaseException:
        ensemble.set_active_kinds(before[0])
        raise
    finally:
        module.neighbour_weight.fill_(before[1])
    table = pd.DataFrame(rows)
    table["gap"], table["gap_se"] = _gaps_to_best(per_condition, table["r2_deg"].to_numpy())
    r2 = table["r2_deg"].to_numpy()
    best = int(np.nanargmax(r2)) if np.isfinite(r2).any() else len(candidates) - 1
    table["chosen"] = table.index == best
    ensemble.set_active_kinds(candidates[best])
    logger.info(
        "Ensemble members chosen on %d validation conditions: %s hidden layer(s) "
        "(DEG-R² %.3f; candidates %s).",
        int(table.loc[best, "n_conditions"]),
        table.loc[best, "member_layers"],
        table.loc[best, "r2_deg"],
        ", ".join(
            f"{m} {v:.3f}" for m, v in zip(table["member_layers"], table["r2_deg"], strict=True)
        ),
    )
    return table


def validation_scorer(
    model,
    adata: AnnData | None = None,
    split_key: str | None = None,
    validation_split: str | None = None,
    n_cells: int = 200,
    seed: int = 0,
) -> _ValidationScorer:
    """The validation cells and settings that score the choices, built once for several."""
    return _ValidationScorer(model, adata, split_key, validation_split, n_cells, seed)


def _check_fitted_ensemble(model) -> None:
    if model.module.generator is None or not bool(model.module.ensemble_fitted):
        raise ValueError(
            "This choice concerns the fitted generator ensemble: train a model with "
            "`n_generators > 0` and `generator_refit_steps > 0` (the defaults)."
        )


class _ValidationScorer:
    """DEG-R² and friends of the model's current state on the unseen validation perturbations.

    The scores use the control and validation cells (and 2,000 training cells for the energy
    distance's principal components), so their cost does not grow with the training set.
    """

    def __init__(
        self,
        model,
        adata: AnnData | None,
        split_key: str | None,
        validation_split: str | None,
        n_cells: int,
        seed: int,
    ):
        params = getattr(model, "train_params_", {}) or {}
        split_key = split_key if split_key is not None else params.get("split_key")
        if validation_split is None:
            validation_split = params.get("validation_split")
        if split_key is None or validation_split is None:
            raise ValueError(
                "Pass `split_key` and `validation_split` (the model was trained without "
                "them): the validation cells must be perturbations that were not trained on."
            )
        adata = adata if adata is not None else model.adata
        adata = model._validate_anndata(model.align_genes(adata))
        if split_key not in adata.obs:
            raise KeyError(f"`split_key={split_key!r}` is not a column of adata.obs.")
        control = model._control_mask(adata)
        if not len(unseen_validation_cells(model, adata, split_key, validation_split, control)):
            raise ValueError(
                f"No perturbed cell with adata.obs[{split_key!r}] == {validation_split!r} "
                "belongs to a perturbation unseen in training: hold out whole perturbations "
                "for validation (e.g. `gim_scvi.data.sciplex3_ood_split(adata, "
                "n_validation_drugs=10)`)."
            )
        self.model = model
        self.split_key = split_key
        self.validation_split = validation_split
        self.train_split = params.get("train_split", "train")
        cells = scoring_cells(adata, split_key, validation_split, self.train_split, control, seed)
        self.adata = adata[cells].copy()
        self.n_cells = n_cells
        self.seed = seed

    def score(self) -> tuple[dict, pd.Series]:
        """Means at the highest dose, and each condition's ``r2_deg`` there."""
        from gim_scvi.tl import evaluate  # tl imports the model package

        scores = evaluate(
            self.model,
            self.adata,
            split_key=self.split_key,
            heldout=self.validation_split,
            train_split=self.train_split,
            baselines=(),
            n_cells=self.n_cells,
            energy_cells=self.n_cells,
            n_pcs=20,
            seed=self.seed,
            degs="pooled_doses" if self.model.module.has_dose else "condition",
        )
        top = scores[scores["dose"] == scores["dose"].max()]
        row = {
            "r2_deg": float(top["r2_deg"].mean()),
            "pearson_delta_deg": float(top["pearson_delta_deg"].mean()),
            "energy_distance": float(top["energy_distance"].mean()),
            "n_conditions": len(top),
        }
        return row, top.set_index(["condition", "cell_line"])["r2_deg"]


def _gaps_to_best(per_condition: list[pd.Series], means: np.ndarray) -> tuple:
    """Each candidate's mean shortfall to the best one and its standard error (paired).

    The series are indexed by (perturbation, cell line). The standard error takes each
    perturbation as one observation (its shortfall averaged over its cell lines): the lines
    of one drug share its intervention, so they are not independent evidence (counted as
    such, the error came out up to ~1.7 times too small with three lines).
    """
    best = per_condition[int(np.nanargmax(means))]
    gaps, errors = [], []
    for scores in per_condition:
        diff = (best - scores.reindex(best.index)).dropna()
        per_drug = diff.groupby(level=0).mean().to_numpy()
        gaps.append(float(diff.mean()) if len(diff) else np.nan)
        errors.append(
            float(per_drug.std(ddof=1) / np.sqrt(len(per_drug))) if len(per_drug) > 1 else 0.0
        )
    return np.asarray(gaps), np.asarray(errors)


def _checked_grid(values, name: str, lower: float | None, upper: float | None) -> tuple:
    values = tuple(float(v) for v in np.atleast_1d(values))
    if not values:
        raise ValueError(f"`{name}` is empty.")
    if lower is None and any(v <= 0 for v in values):
        raise ValueError(f"`{name}` must be positive, got {values}.")
    if lower is not None and any(not lower <= v <= upper for v in values):
        raise ValueError(f"`{name}` must lie in [{lower}, {upper}], got {values}.")
    return values
