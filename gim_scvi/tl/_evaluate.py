"""Scoring predictions of held-out perturbations against real cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from gim_scvi.tl._metrics import (
    graph_recovery,
    match_programs,
    pearson_delta,
    r2_score_means,
    target_recovery,
)


def lognorm(x, target_sum: float = 1e4):
    """``log1p(normalize_total(x, target_sum))`` of a counts matrix, kept sparse if sparse."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32, copy=True)
        sums = np.asarray(x.sum(axis=1)).reshape(-1)
        scale = target_sum / np.maximum(sums, 1e-12)
        x = sp.diags(scale.astype(np.float32)) @ x
        x.data = np.log1p(x.data)
        return x.tocsr()
    x = np.asarray(x, dtype=np.float32)
    sums = x.sum(axis=1, keepdims=True)
    return np.log1p(x * (target_sum / np.maximum(sums, 1e-12)))


def group_means(x, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean row of ``x`` for each group label (sparse-aware; no densification of ``x``)."""
    labels, inverse = np.unique(groups, return_inverse=True)
    indicator = sp.csr_matrix(
        (np.ones(len(groups), dtype=np.float32), (inverse, np.arange(len(groups)))),
        shape=(len(labels), len(groups)),
    )
    counts = np.asarray(indicator.sum(axis=1)).reshape(-1, 1)
    sums = indicator @ x
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return labels, sums / counts


def _context_key(condition, dose, line) -> np.ndarray:
    return np.array(
        [f"{c} | {float(d):g} | {ln}" for c, d, ln in zip(condition, dose, line, strict=True)]
    )


def top_degs(
    expression, context: np.ndarray, is_control: np.ndarray, line: np.ndarray, n_degs: int
) -> dict[str, np.ndarray]:
    """Top ``n_degs`` genes per context (scanpy t-test vs same-line controls, by abs score)."""
    degs = {}
    for ln in np.unique(line):
        sel = line == ln
        groups = np.where(is_control[sel], "__control__", context[sel])
        if (groups == "__control__").sum() < 2:
            continue
        tmp = AnnData(X=expression[np.flatnonzero(sel)])
        tmp.obs["group"] = pd.Categorical(groups)
        targets = [g for g in tmp.obs["group"].cat.categories if g != "__control__"]
        sc.tl.rank_genes_groups(
            tmp,
            "group",
            groups=targets,
            reference="__control__",
            method="t-test",
            rankby_abs=True,
            n_genes=n_degs,
        )
        names = tmp.uns["rank_genes_groups"]["names"]
        for g in targets:
            degs[g] = np.asarray(names[g]).astype(int)
    return degs


def evaluate(
    model,
    adata: AnnData | None = None,
    split_key: str = "split",
    heldout: str = "test",
    n_cells: int = 200,
    n_degs: int = 50,
    mode: str = "map",
    seed: int = 0,
) -> pd.DataFrame:
    """Score a model's predictions of held-out conditions next to the control-mean baseline.

    For each held-out (perturbation, dose, cell line), the mean of
    ``log1p(normalize_total(1e4))`` expression of the predicted cells is compared with that of
    the real cells: R² on all genes and on the top ``n_degs`` DEGs (scanpy t-test against the
    same line's controls, ranked by ``|score|``), both unclipped, and the Pearson correlation
    of the deltas to the control mean on all genes and on the DEGs.

    Parameters
    ----------
    model
        A trained :class:`~gim_scvi.GIM`.
    adata
        Registered AnnData with real cells (default: the model's).
    split_key
        Column of ``adata.obs`` with the split.
    heldout
        Value of ``split_key`` marking the held-out cells to score.
    n_cells
        Predicted cells per condition.
    n_degs
        Number of DEGs per condition.
    mode
        Prediction mode (see :meth:`~gim_scvi.GIM.predict`).
    seed
        Seed of the prediction.

    Returns
    -------
    Tidy DataFrame with one row per condition and method and columns ``condition``, ``dose``,
    ``cell_line``, ``method``, ``r2_all``, ``r2_deg``, ``pearson_delta_all``,
    ``pearson_delta_deg``, ``n_cells``.
    """
    adata = adata if adata is not None else model.adata
    adata = model._validate_anndata(model.align_genes(adata))
    if split_key not in adata.obs:
        raise KeyError(f"`split_key={split_key!r}` is not a column of adata.obs.")
    layer = model.registry_["setup_args"]["layer"]
    x = adata.layers[layer] if layer is not None else adata.X
    is_control = model._control_mask(adata)
    held = (adata.obs[split_key].astype(str).to_numpy() == heldout) & ~is_control
    if not held.any():
        raise ValueError(f"No perturbed cell has adata.obs[{split_key!r}] == {heldout!r}.")
    names = model._perturbation_names(adata)
    doses = model._doses(adata)
    doses = doses if doses is not None else np.ones(adata.n_obs, np.float32)
    lines = np.asarray(model.cell_lines)[model._cell_line_codes(adata)]
    context = _context_key(names, doses, lines)

    scored = held | is_control
    idx = np.flatnonzero(scored)
    expr = lognorm(x[idx]) if model.module.gene_likelihood != "normal" else x[idx]
    labels, means = group_means(
        expr, np.where(is_control[idx], "control | " + lines[idx], context[idx])
    )
    real = dict(zip(labels, means, strict=True))
    degs = top_degs(expr, context[idx], is_control[idx], lines[idx], n_degs)

    # one prediction call per (perturbation, dose) over the lines it was observed in
    frame = pd.DataFrame({"condition": names[held], "dose": doses[held], "cell_line": lines[held]})
    first = (
        pd.Series(np.flatnonzero(held))
        .groupby([frame["condition"].to_numpy(), frame["dose"].to_numpy()])
        .first()
    )
    feats = model._features(adata)[first.to_numpy()]
    pred_names = [c for c, _ in first.index]
    pred_doses = np.array([d for _, d in first.index], np.float32)
    pred = model.predict(
        features=feats,
        doses=pred_doses if model.module.has_dose else None,
        cell_lines=sorted(set(frame["cell_line"])),
        conditions=pred_names,
        adata=adata,
        n_cells=n_cells,
        mode=mode,
        seed=seed,
    )
    pred_dose = pred.obs["dose"].to_numpy() if model.module.has_dose else np.ones(pred.n_obs)
    pred_ctx = _context_key(pred.obs["condition"], pred_dose, pred.obs["cell_line"])
    pred_expr = lognorm(pred.X) if model.module.gene_likelihood != "normal" else pred.X
    p_labels, p_means = group_means(pred_expr, pred_ctx)
    predicted = dict(zip(p_labels, p_means, strict=True))

    rows = []
    counts = pd.Series(context[held]).value_counts()
    for ctx in sorted(set(context[held])):
        cond, dose, line = ctx.split(" | ")
        control_mean = real[f"control | {line}"]
        for method, profile in [("GIM", predicted[ctx]), ("control_mean", control_mean)]:
            rows.append(
                _score(real[ctx], profile, control_mean, degs.get(ctx))
                | {
                    "condition": cond,
                    "dose": float(dose),
                    "cell_line": line,
                    "method": method,
                    "n_cells": int(counts[ctx]),
                }
            )
    cols = ["condition", "dose", "cell_line", "method", "n_cells"]
    out = pd.DataFrame(rows)
    return out[cols + [c for c in out.columns if c not in cols]]


def _score(true, pred, control, deg_idx) -> dict[str, float]:
    out = {
        "r2_all": r2_score_means(true, pred),
        "pearson_delta_all": pearson_delta(true, pred, control),
    }
    if deg_idx is not None:
        out["r2_deg"] = r2_score_means(true[deg_idx], pred[deg_idx])
        out["pearson_delta_deg"] = pearson_delta(true[deg_idx], pred[deg_idx], control[deg_idx])
    return out


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and median of each metric per method, at the highest dose and over all doses."""
    metrics = [c for c in results.columns if c.startswith(("r2_", "pearson_"))]
    top = results[results["dose"] == results["dose"].max()]
    parts = []
    for label, frame in [("highest_dose", top), ("all_doses", results)]:
        agg = frame.groupby("method")[metrics].agg(["mean", "median"])
        agg.columns = [f"{m}_{s}" for m, s in agg.columns]
        agg.insert(0, "doses", label)
        parts.append(agg)
    return pd.concat(parts).reset_index()


def ground_truth_recovery(model, adata: AnnData | None = None) -> dict[str, float]:
    """Target and graph recovery against ``adata.uns["ground_truth"]`` (synthetic data).

    Learned programs are matched to true programs by Hungarian matching on the absolute
    correlation of gene loadings; target probabilities (averaged over cell lines) are then
    scored against the true targets, on all drugs and on the held-out ones.
    """
    adata = adata if adata is not None else model.adata
    truth = adata.uns["ground_truth"]
    true_loadings = truth["loadings"].loc[model._var_names()].to_numpy()
    match = match_programs(true_loadings, model.get_gene_programs().to_numpy())
    probs = model.get_intervention_targets(adata=adata).groupby(level="condition").mean()
    true_targets = truth["targets"].loc[probs.index]
    out = target_recovery(true_targets.to_numpy(), probs.to_numpy(), match)
    split = truth["drugs"]["split"].loc[probs.index]
    for name in ("test",):
        sel = (split == name).to_numpy()
        if sel.any():
            rec = target_recovery(true_targets.to_numpy()[sel], probs.to_numpy()[sel], match)
            out |= {f"{k}_{name}": v for k, v in rec.items()}
    out |= graph_recovery(truth["dag"].to_numpy(), model.get_causal_graph().to_numpy(), match)
    return out
