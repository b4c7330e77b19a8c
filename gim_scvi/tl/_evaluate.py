"""Scoring predictions of held-out perturbations against real cells."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA

from gim_scvi._utils import context_labels
from gim_scvi.tl._baselines import BASELINES, TrainingProfiles
from gim_scvi.tl._metrics import (
    energy_distance,
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
    train_split: str = "train",
    baselines: tuple[str, ...] = (
        "control_mean",
        "mean_shift",
        "nearest_drug",
        "ridge",
        "additive",
    ),
    n_cells: int = 200,
    n_degs: int = 50,
    n_pcs: int = 50,
    energy_cells: int = 200,
    mode: str = "mean",
    seed: int = 0,
    key_added: str | None = None,
    combination_separator: str = "+",
    degs: Literal["condition", "pooled_doses"] | Mapping[str, Sequence[str]] = "condition",
) -> pd.DataFrame:
    """Score predictions of held-out conditions next to simple baselines.

    For each held-out (perturbation, dose, cell line), the mean of
    ``log1p(normalize_total(1e4))`` expression of the predicted cells is compared with that of
    the real cells: R² on all genes and on the top ``n_degs`` DEGs (scanpy t-test of the
    held-out cells against the same line's controls, ranked by ``|score|``; see ``degs``),
    unclipped and clipped at 0; the Pearson correlation of the deltas to the control mean on
    all genes and on the DEGs; and the Euclidean energy distance between predicted and real
    cells on ``n_pcs`` principal components fitted on training cells (``energy_cells`` cells
    per side). The baselines
    (:mod:`gim_scvi.tl._baselines`) are fitted on the training conditions only; their cells are
    the line's control cells shifted by their predicted change.

    A held-out perturbation named ``"a+b"`` (``combination_separator``) whose parts ``a`` and
    ``b`` are perturbations of other cells in ``adata`` is scored as a **combination**: the
    model composes the interventions of the parts (their features taken from those cells,
    each at the condition's dose), the ``additive`` baseline adds the parts' training shifts,
    and of the other baselines only those that ignore the features (``control_mean``,
    ``mean_shift``) are scored. ``additive`` has no row for single perturbations, nor
    ``nearest_drug`` and ``ridge`` for combinations. Score combinations and single
    perturbations in separate calls (e.g. ``heldout="combo"`` on
    :func:`gim_scvi.data.synthetic` with ``n_combinations``) so that their summaries stay apart.

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
    train_split
        Value of ``split_key`` marking the training cells (used to fit the baselines and PCs).
    baselines
        Names of the baselines to score beside the model.
    n_cells
        Predicted cells per condition.
    n_degs
        Number of DEGs per condition.
    n_pcs
        Principal components for the energy distance.
    energy_cells
        Cells per side for the energy distance (subsampled with ``seed``).
    mode
        Prediction mode (see :meth:`~gim_scvi.GIM.predict`).
    seed
        Seed of the prediction and of the subsampling.
    key_added
        If given, write ``results``, ``summary`` and ``params`` to ``adata.uns[key_added]``.
    combination_separator
        Joins the names of a combination's parts in the perturbation names.
    degs
        Which cells define a condition's DEGs: ``"condition"``, its own cells (one list per
        perturbation x dose x cell line); ``"pooled_doses"``, the cells of every held-out dose
        of its perturbation in its line (one list per perturbation x cell line, shared by the
        doses), as chemCPA's ``uns["all_DEGs"]`` (grouped by ``cov_drug``), on which the
        published sci-Plex DEG-R² values were computed. With few cells per condition the
        t-test of ``"condition"`` ranks first genes detected in none of them, and for a
        perturbation without effect the DEG-R² of every method is then a large negative number
        (or undefined); pooling the doses gives more cells per list. Or given lists: a mapping
        from ``"perturbation | cell line"`` or ``"perturbation | dose | cell line"`` labels to
        gene names, e.g. chemCPA's file's own lists from
        :func:`gim_scvi.data.sciplex3_degs` (used as given, not cut to ``n_degs``).

    Returns
    -------
    DataFrame
        Tidy table with one row per condition and method and columns ``condition``,
        ``dose``, ``cell_line``, ``method``, ``n_cells``, ``r2_all``, ``r2_all_clipped``,
        ``r2_deg``, ``r2_deg_clipped``, ``pearson_delta_all``, ``pearson_delta_deg``,
        ``energy_distance``.
    """
    user_adata = adata if adata is not None else model.adata
    adata = model._validate_anndata(model.align_genes(user_adata))
    for name in baselines:
        if name not in BASELINES:
            raise ValueError(f"Unknown baseline {name!r}; choose from {sorted(BASELINES)}.")
    if split_key not in adata.obs:
        raise KeyError(f"`split_key={split_key!r}` is not a column of adata.obs.")
    rng = np.random.default_rng(seed)
    layer = model.registry_["setup_args"]["layer"]
    x = adata.layers[layer] if layer is not None else adata.X
    features = model._features(adata)
    is_control = model._control_mask(adata, features)
    split = adata.obs[split_key].astype(str).to_numpy()
    held = (split == heldout) & ~is_control
    train = (split == train_split) & ~is_control
    present = sorted(set(split[~is_control]))
    if not held.any():
        raise ValueError(
            f"No perturbed cell has adata.obs[{split_key!r}] == {heldout!r} (values of perturbed "
            f"cells: {present}); pass one of them as `heldout`."
        )
    if heldout != train_split and not train.any():
        raise ValueError(
            f"No perturbed cell has adata.obs[{split_key!r}] == {train_split!r}, so the "
            f"baselines have nothing to learn from (values of perturbed cells: {present}); pass "
            "the training cells' value as `train_split`."
        )
    names = model._perturbation_names(adata, features)
    doses = model._doses(adata)
    doses = doses if doses is not None else np.ones(adata.n_obs, np.float32)
    lines = np.asarray(model.cell_lines)[model._cell_line_codes(adata)]
    context = context_labels(names, doses, lines)
    deg_group = None if isinstance(degs, Mapping) else _deg_groups(degs, names, doses, lines)
    normal = model.module.gene_likelihood == "normal"
    parts = _combination_parts(names, held, is_control, features, combination_separator)

    idx = np.flatnonzero(is_control | held | train)
    expr = x[idx] if normal else lognorm(x[idx])
    group = np.where(is_control[idx], "control | " + lines[idx], context[idx])
    labels, means = group_means(expr, group)
    real = dict(zip(labels, means, strict=True))
    local = {
        name: np.flatnonzero(mask[idx])
        for name, mask in (("control", is_control), ("held", held), ("train", train))
    }
    sel = np.concatenate([local["control"], local["held"]])
    first_cell = pd.Series(np.flatnonzero(held)).groupby(context[held]).first()
    if isinstance(degs, Mapping):
        deg_of_context = _given_degs(degs, first_cell, names, lines, adata.var_names)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deg_lists = top_degs(
                expr[sel], deg_group[idx][sel], is_control[idx][sel], lines[idx][sel], n_degs
            )
        deg_of_context = {ctx: deg_lists.get(deg_group[i]) for ctx, i in first_cell.items()}
    pca = _fit_pca(expr, np.concatenate([local["train"], local["control"]]), n_pcs, rng)

    profiles = _training_profiles(features, train, context, real)
    fitted = [BASELINES[name]().fit(profiles) for name in baselines]
    pred = _predict_heldout(
        model, adata, features, held, names, doses, lines, parts, n_cells, mode, seed
    )
    pred_dose = np.ones(pred.n_obs)
    if model.module.has_dose:  # a combination's dose reads "d+d": its parts share the dose
        pred_dose = pred.obs["dose"].astype(str).str.split("+").str[0].astype(float).to_numpy()
    pred_ctx = context_labels(pred.obs["condition"], pred_dose, pred.obs["cell_line"])
    pred_expr = pred.X if normal else lognorm(pred.X)
    p_labels, p_means = group_means(pred_expr, pred_ctx)
    predicted = dict(zip(p_labels, p_means, strict=True))

    rows = []
    counts = pd.Series(context[held]).value_counts()
    ctrl_local = {ln: local["control"][lines[idx][local["control"]] == ln] for ln in set(lines)}
    for ctx in sorted(set(context[held])):
        cond, dose, line = ctx.split(" | ")
        control_mean = real[f"control | {line}"]
        truth_cells = _project(pca, expr, np.flatnonzero(context[idx] == ctx), energy_cells, rng)
        gim_cells = _project(pca, pred_expr, np.flatnonzero(pred_ctx == ctx), energy_cells, rng)
        methods = [("GIM", predicted[ctx], gim_cells)]
        ctrl_cells = _project(
            pca, expr, ctrl_local.get(line, np.array([], int)), energy_cells, rng
        )
        kind = "combination" if cond in parts else "single"
        cond_features = parts[cond] if cond in parts else features[first_cell[ctx]]
        for baseline in fitted:
            if kind not in baseline.kinds:
                continue
            delta = baseline.predict_delta(cond_features, float(dose), line)
            methods.append(
                (
                    baseline.name,
                    control_mean + delta,
                    ctrl_cells + delta @ pca.components_.T,  # shift control cells by delta
                )
            )
        for method, profile, cells in methods:
            rows.append(
                _score(real[ctx], profile, control_mean, deg_of_context[ctx])
                | {
                    "energy_distance": energy_distance(cells, truth_cells),
                    "condition": cond,
                    "dose": float(dose),
                    "cell_line": line,
                    "method": method,
                    "n_cells": int(counts[ctx]),
                }
            )
    cols = ["condition", "dose", "cell_line", "method", "n_cells"]
    out = pd.DataFrame(rows)
    out = out[cols + [c for c in out.columns if c not in cols]]
    if key_added is not None:
        user_adata.uns[key_added] = {
            "results": out,
            "summary": summarize(out),
            "params": {
                "split_key": split_key,
                "heldout": heldout,
                "train_split": train_split,
                "baselines": list(baselines),
                "n_cells": n_cells,
                "n_degs": n_degs,
                "n_pcs": n_pcs,
                "energy_cells": energy_cells,
                "mode": mode,
                "seed": seed,
                "degs": "given" if isinstance(degs, Mapping) else degs,
            },
        }
    return out


def _deg_groups(degs: str, names: np.ndarray, doses: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """Label of each cell's DEG list: its context, or its perturbation and line (all doses)."""
    if degs == "condition":
        return context_labels(names, doses, lines)
    if degs == "pooled_doses":
        return context_labels(names, None, lines)
    raise ValueError(f"degs must be 'condition' or 'pooled_doses', got {degs!r}.")


def _given_degs(
    degs: Mapping[str, Sequence[str]],
    first_cell: pd.Series,
    names: np.ndarray,
    lines: np.ndarray,
    var_names: pd.Index,
) -> dict[str, np.ndarray]:
    """Gene indices of each held-out context's given DEGs (by its label, else its pooled one)."""
    out, missing_contexts, missing_genes = {}, [], set()
    for ctx, i in first_cell.items():
        pooled = f"{names[i]} | {lines[i]}"
        genes = degs.get(ctx, degs.get(pooled))
        if genes is None:
            missing_contexts.append(pooled)
            continue
        genes = pd.Index(np.asarray(genes).astype(str))
        known = genes.isin(var_names)
        missing_genes.update(genes[~known])
        out[ctx] = var_names.get_indexer(genes[known])
    if missing_contexts:
        raise KeyError(
            f"No DEG list for {len(set(missing_contexts))} held-out condition(s), e.g. "
            f"{sorted(set(missing_contexts))[:3]}: give lists keyed by 'perturbation | cell line' "
            "or 'perturbation | dose | cell line'."
        )
    if missing_genes:
        warnings.warn(
            f"{len(missing_genes)} given DEG(s) are not among the model's genes and are left "
            f"out, e.g. {sorted(missing_genes)[:5]}.",
            UserWarning,
            stacklevel=3,
        )
    return out


def _training_profiles(features, train, context, real) -> TrainingProfiles:
    """Mean shift of every training condition from its line's controls."""
    if not train.any():
        raise ValueError("No perturbed training cell: the baselines have nothing to learn from.")
    first = pd.Series(np.flatnonzero(train)).groupby(context[train]).first()
    keys = first.index.to_numpy()
    parts = [k.split(" | ") for k in keys]
    lines = np.array([p[2] for p in parts])
    deltas = np.stack(
        [real[k] - real[f"control | {ln}"] for k, ln in zip(keys, lines, strict=True)]
    )
    return TrainingProfiles(
        features=features[first.to_numpy()],
        doses=np.array([float(p[1]) for p in parts]),
        lines=lines,
        deltas=deltas,
        control_means={ln: real[f"control | {ln}"] for ln in set(lines)},
    )


def _combination_parts(
    names: np.ndarray, held: np.ndarray, is_control: np.ndarray, features, separator: str
) -> dict[str, np.ndarray]:
    """Held-out combination name -> ``n_parts x P`` features of its parts.

    A name is a combination when it joins, with ``separator``, names of perturbations that
    some non-held-out, non-control cells carry; the parts' features are those cells'.
    """
    known = (
        pd.Series(np.flatnonzero(~held & ~is_control)).groupby(names[~held & ~is_control]).first()
    )
    out = {}
    for name in np.unique(names[held]):
        pieces = name.split(separator) if separator else [name]
        if len(pieces) > 1 and all(p in known.index for p in pieces):
            out[name] = np.asarray(features[known[pieces].to_numpy()])
    return out


def _predict_heldout(
    model, adata, features, held, names, doses, lines, parts, n_cells, mode, seed
) -> AnnData:
    """One prediction call for every held-out (perturbation, dose) in its cell lines.

    ``parts`` maps combination names to their parts' feature rows; the model composes their
    interventions.
    """
    frame = pd.DataFrame({"condition": names[held], "dose": doses[held]})
    first = (
        pd.Series(np.flatnonzero(held))
        .groupby([frame["condition"].to_numpy(), frame["dose"].to_numpy()])
        .first()
    )
    rows = features[first.to_numpy()]
    if parts:
        width = max(len(p) for p in parts.values())
        stacked = np.zeros((len(rows), width, rows.shape[1]), dtype=rows.dtype)
        for i, (name, _) in enumerate(first.index):
            own = parts.get(name, rows[i : i + 1])
            stacked[i, : len(own)] = own
        rows = stacked
    return model.predict(
        features=rows,
        doses=np.array([d for _, d in first.index], np.float32) if model.module.has_dose else None,
        cell_lines=sorted(set(lines[held])),
        conditions=[c for c, _ in first.index],
        adata=adata,
        n_cells=n_cells,
        mode=mode,
        seed=seed,
    )


def _fit_pca(expr, rows: np.ndarray, n_pcs: int, rng: np.random.Generator, max_cells=10000):
    """PCA on (a subsample of) the given rows of the expression matrix."""
    pick = rng.choice(rows, size=min(len(rows), max_cells), replace=False)
    sub = expr[np.sort(pick)]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    n_pcs = min(n_pcs, sub.shape[0] - 1, sub.shape[1])
    return PCA(n_components=n_pcs, random_state=0).fit(sub)


def _project(pca, expr, rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """PC coordinates of up to ``n`` rows (subsampled without replacement)."""
    if len(rows) == 0:
        return np.zeros((0, pca.n_components_))
    pick = np.sort(rng.choice(rows, size=min(len(rows), n), replace=False))
    sub = expr[pick]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return pca.transform(sub)


def _score(true, pred, control, deg_idx) -> dict[str, float]:
    out = {"r2_all": r2_score_means(true, pred)}
    out["r2_all_clipped"] = max(out["r2_all"], 0.0)
    if deg_idx is not None:
        out["r2_deg"] = r2_score_means(true[deg_idx], pred[deg_idx])
        out["r2_deg_clipped"] = max(out["r2_deg"], 0.0)
    out["pearson_delta_all"] = pearson_delta(true, pred, control)
    if deg_idx is not None:
        out["pearson_delta_deg"] = pearson_delta(true[deg_idx], pred[deg_idx], control[deg_idx])
    return out


def conditions_at(results: pd.DataFrame, doses: str) -> pd.DataFrame:
    """Rows of an :func:`evaluate` table at the highest dose (``"highest"``) or all (``"all"``)."""
    if doses == "all":
        return results
    if doses == "highest":
        return results[results["dose"] == results["dose"].max()]
    raise ValueError(f"doses must be 'highest' or 'all', got {doses!r}.")


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and median of each metric per method, at the highest dose and over all doses.

    Undefined values (NaN) are left out of means and medians; ``n_conditions`` counts the
    conditions scored and ``n_r2_deg`` those with a defined DEG-R². DEG-R² is undefined when
    a condition's top DEGs all have the same observed mean, typically genes detected in none
    of the cells of a condition with few cells (the t-test ranks them first).
    """
    metrics = [c for c in results.columns if c.startswith(("r2_", "pearson_", "energy_"))]
    top = conditions_at(results, "highest")
    parts = []
    for label, frame in [("highest_dose", top), ("all_doses", results)]:
        groups = frame.groupby("method")
        agg = groups[metrics].agg(["mean", "median"])
        agg.columns = [f"{m}_{s}" for m, s in agg.columns]
        agg.insert(0, "doses", label)
        agg.insert(1, "n_conditions", groups.size())
        agg.insert(2, "n_r2_deg", groups["r2_deg"].count())
        parts.append(agg)
    return pd.concat(parts).reset_index()


def ground_truth_recovery(model, adata: AnnData | None = None) -> dict[str, float]:
    """Target and graph recovery against ``adata.uns["ground_truth"]`` (synthetic data).

    Learned programs are matched to true programs by Hungarian matching on the absolute
    correlation of gene loadings; target probabilities (averaged over cell lines) are then
    scored against the true targets, on all drugs and on the held-out ones (combinations of
    drugs are left out).

    Keys: ``target_auroc`` / ``target_auprc`` (all drugs, targets as
    :meth:`~gim_scvi.GIM.get_intervention_targets` reports them), ``*_test`` (held-out drugs),
    ``*_active`` (drugs that are not nearly inert), ``*_own_cells`` (all drugs, with
    ``no_effect="cells"``: training drugs without a fitted effect keep the fit to their own
    cells), ``graph_auroc`` and ``graph_shd``.
    """
    adata = adata if adata is not None else model.adata
    truth = adata.uns["ground_truth"]
    true_loadings = truth["loadings"].loc[model._var_names()].to_numpy()
    match = match_programs(true_loadings, model.get_gene_programs().to_numpy())
    drugs = truth["drugs"]
    out: dict[str, float] = {}
    for suffix, no_effect in (("", "features"), ("_own_cells", "cells")):
        probs = model.get_intervention_targets(adata=adata, no_effect=no_effect)
        probs = probs.groupby(level="condition").mean()
        probs = probs[probs.index.isin(truth["targets"].index)]  # single drugs (no combos)
        true_targets = truth["targets"].loc[probs.index].to_numpy()
        subsets = {"": np.ones(len(probs), dtype=bool)}
        if not suffix:
            subsets["_test"] = (drugs["split"].loc[probs.index] == "test").to_numpy()
            if "inert" in drugs:
                subsets["_active"] = ~drugs["inert"].loc[probs.index].to_numpy(dtype=bool)
        for name, sel in subsets.items():
            if sel.any():
                rec = target_recovery(true_targets[sel], probs.to_numpy()[sel], match)
                out |= {f"{k}{name}{suffix}": v for k, v in rec.items()}
    out |= graph_recovery(truth["dag"].to_numpy(), model.get_causal_graph().to_numpy(), match)
    return out


def condition_deltas(
    model,
    adata: AnnData,
    condition: str,
    dose: float | None = None,
    cell_line: str | None = None,
    n_degs: int = 50,
    n_cells: int = 200,
    mode: str = "mean",
    seed: int = 0,
) -> dict:
    """Observed and predicted mean log1p-normalised profiles of one condition on its DEGs.

    Returns
    -------
    dict
        ``genes`` (the DEGs), ``observed_mean``, ``predicted_mean``, ``control_mean``,
        ``observed_delta``, ``predicted_delta`` (on the DEGs), ``dose`` and ``cell_line``.
    """
    adata = model._validate_anndata(model.align_genes(adata))
    layer = model.registry_["setup_args"]["layer"]
    x = adata.layers[layer] if layer is not None else adata.X
    names = model._perturbation_names(adata)
    is_control = model._control_mask(adata)
    lines = np.asarray(model.cell_lines)[model._cell_line_codes(adata)]
    doses = model._doses(adata)
    mine = (names == condition) & ~is_control
    if not mine.any():
        raise ValueError(f"No perturbed cell of condition {condition!r} in the AnnData.")
    line = cell_line or str(lines[mine][0])
    mine &= lines == line
    if doses is not None:
        dose = float(doses[mine].max()) if dose is None else float(dose)
        mine &= np.isclose(doses, dose)
    if not mine.any():
        raise ValueError(f"No cell of {condition!r} at dose {dose} in cell line {line!r}.")
    controls = is_control & (lines == line)
    rows = np.flatnonzero(mine | controls)
    normal = model.module.gene_likelihood == "normal"
    expr = x[rows] if normal else lognorm(x[rows])
    labels = np.where(controls[rows], "__control__", condition)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        degs = top_degs(expr, labels, controls[rows], np.full(len(rows), line), n_degs)
    genes = degs[condition]
    _, means = group_means(expr, labels)  # sorted labels: "__control__" first
    control_mean, observed = means[0], means[1]
    pred = model.predict(
        features=model._features(adata)[np.flatnonzero(mine)[:1]],
        doses=dose if model.module.has_dose else None,
        cell_lines=line,
        conditions=[condition],
        adata=adata,
        n_cells=n_cells,
        mode=mode,
        seed=seed,
    )
    predicted = np.asarray((pred.X if normal else lognorm(pred.X)).mean(axis=0)).ravel()
    return {
        "genes": np.asarray(adata.var_names[genes]),
        "observed_mean": observed[genes],
        "predicted_mean": predicted[genes],
        "control_mean": control_mean[genes],
        "observed_delta": observed[genes] - control_mean[genes],
        "predicted_delta": predicted[genes] - control_mean[genes],
        "dose": np.nan if dose is None else dose,
        "cell_line": line,
    }
