"""Paired comparison of methods over held-out perturbations (cluster bootstrap)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gim_scvi.tl._evaluate import conditions_at

LOWER_IS_BETTER = {"energy_distance"}


def compare(
    results: pd.DataFrame,
    metric: str = "r2_deg",
    reference: str = "GIM",
    doses: str = "highest",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired differences between a reference method and every other one, with bootstrap CIs.

    Held-out conditions of one perturbation (its doses and cell lines) are not independent, so
    the bootstrap resamples **perturbations** with replacement and keeps all their conditions
    (a cluster bootstrap). Only conditions where both methods have a defined value are paired.
    With a handful of held-out perturbations the intervals are wide: a lead in the mean is a
    lead of this set of perturbations, not necessarily of the method.

    Parameters
    ----------
    results
        The per-condition table of :func:`gim_scvi.tl.evaluate`.
    metric
        A score column, e.g. ``"r2_deg"``, ``"pearson_delta_deg"``, ``"energy_distance"``.
    reference
        The method compared with each of the others.
    doses
        ``"highest"`` (conditions at the highest dose, as :func:`summarize`) or ``"all"``.
    n_boot
        Bootstrap resamples.
    confidence
        Coverage of the interval.
    seed
        Seed of the resampling.

    Returns
    -------
    DataFrame
        One row per other method: ``n_perturbations``, ``n_conditions`` (paired),
        ``reference_mean``, ``method_mean``, ``difference`` (reference minus method; for
        ``energy_distance``, where lower is better, method minus reference, so that positive
        always favours the reference), ``ci_low``, ``ci_high`` and ``p_reference_better``
        (fraction of resamples in which the difference is positive).
    """
    for col in ("condition", "dose", "cell_line", "method", metric):
        if col not in results:
            raise KeyError(f"results has no column {col!r}: pass the table of tl.evaluate.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    table = conditions_at(results, doses)
    wide = table.pivot_table(
        index=["condition", "dose", "cell_line"], columns="method", values=metric, dropna=False
    )
    if reference not in wide:
        methods = sorted(results["method"].unique())
        raise ValueError(f"No method {reference!r} in the results; methods: {methods}.")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    rows = []
    for method in sorted(m for m in wide.columns if m != reference):
        pair = wide[[reference, method]].dropna()
        if pair.empty:
            continue
        diff = sign * (pair[reference] - pair[method])
        perturbation = pair.index.get_level_values("condition").to_numpy()
        boot = _cluster_bootstrap_means(diff.to_numpy(), perturbation, n_boot, rng)
        rows.append(
            {
                "method": method,
                "n_perturbations": len(np.unique(perturbation)),
                "n_conditions": len(pair),
                "reference_mean": pair[reference].mean(),
                "method_mean": pair[method].mean(),
                "difference": diff.mean(),
                "ci_low": np.quantile(boot, alpha),
                "ci_high": np.quantile(boot, 1 - alpha),
                "p_reference_better": float((boot > 0).mean()),
            }
        )
    out = pd.DataFrame(rows)
    out.attrs |= {"metric": metric, "reference": reference, "doses": doses}
    return out


def _cluster_bootstrap_means(
    values: np.ndarray, cluster: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Means of ``values`` over resamples of whole clusters (drawn with replacement)."""
    labels, index = np.unique(cluster, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(float)
    draws = rng.integers(len(labels), size=(n_boot, len(labels)))
    return sums[draws].sum(1) / counts[draws].sum(1)
