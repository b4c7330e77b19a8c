"""Scanpy-style plots of what a GIM learned."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData


def _finish(ax, show: bool | None, save: str | Path | None):
    """Save if asked, show if asked (default: show unless saving); return Axes otherwise."""
    import matplotlib.pyplot as plt

    fig = ax.figure if not isinstance(ax, np.ndarray) else ax.flat[0].figure
    if save is not None:
        fig.savefig(save, bbox_inches="tight", dpi=150)
    if show is None:
        show = save is None and plt.get_backend().lower() != "agg"
    if show:
        plt.show()
        return None
    return ax


def _new_ax(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def targets(
    model,
    conditions: Sequence[str] | None = None,
    groupby: str | None = None,
    annotation: pd.Series | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    **kwargs,
):
    """Heatmap of target probabilities (condition x program) with :func:`scanpy.pl.matrixplot`.

    Parameters
    ----------
    model
        A trained :class:`~gim_scvi.GIM`, or the AnnData of
        :meth:`~gim_scvi.GIM.targets_to_adata`.
    conditions
        Conditions (perturbation names) to show; default all.
    groupby
        Column of the targets AnnData's ``.obs`` to group rows by (default ``"condition"``);
        with ``annotation`` (e.g. a pathway per perturbation), rows are grouped by it.
    annotation
        Optional Series mapping perturbation names to a grouping label (e.g. pathway); it is
        added as ``.obs["annotation"]`` and used as ``groupby``.
    show, save
        Show the figure / save it to a file.
    **kwargs
        Passed to :func:`scanpy.pl.matrixplot`.

    Returns
    -------
    dict or None
        The matrixplot's dictionary of Axes when ``show=False``.
    """
    import scanpy as sc

    tad = model.copy() if isinstance(model, AnnData) else model.targets_to_adata()
    if conditions is not None:
        missing = sorted(set(conditions) - set(tad.obs["condition"].astype(str)))
        if missing:
            raise ValueError(f"Unknown condition(s) {missing[:5]}.")
        tad = tad[tad.obs["condition"].astype(str).isin(conditions)].copy()
    if annotation is not None:
        labels = tad.obs["condition"].astype(str).map(annotation).fillna("unannotated")
        tad.obs["annotation"] = pd.Categorical(labels)
        groupby = "annotation"
    groupby = groupby or "condition"
    kwargs.setdefault("cmap", "viridis")
    kwargs.setdefault("vmin", 0.0)
    kwargs.setdefault("vmax", 1.0)
    kwargs.setdefault("colorbar_title", "target\nprobability")
    axes = sc.pl.matrixplot(
        tad, var_names=list(tad.var_names), groupby=groupby, show=False, **kwargs
    )
    if _finish(axes["mainplot_ax"], show, save) is None:
        return None
    return axes


def causal_graph(
    model,
    condition: str | None = None,
    cell_line: str | None = None,
    min_weight: float = 0.0,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """The learned program graph; edge width by the absolute weight, colour by its sign.

    Parameters
    ----------
    model
        A trained :class:`~gim_scvi.GIM`.
    condition
        A perturbation of the training data whose targets are highlighted (node colour =
        target probability).
    cell_line
        Cell line for ``condition`` (default: mean over lines).
    min_weight
        Hide edges with ``|w|`` at or below this.
    ax, show, save
        Matplotlib Axes to draw into; show / save the figure.
    """
    import matplotlib.pyplot as plt
    import networkx as nx

    graph = model.get_causal_graph()
    digraph = nx.DiGraph()
    digraph.add_nodes_from(graph.index)
    for src in graph.index:
        for dst in graph.columns:
            w = float(graph.loc[src, dst])
            if abs(w) > min_weight:
                digraph.add_edge(src, dst, weight=w)
    ax = _new_ax(ax, (6, 6))
    pos = nx.circular_layout(digraph)
    colors = np.zeros(len(graph))
    if condition is not None:
        tp = model.get_intervention_targets()
        if condition not in tp.index.get_level_values("condition"):
            raise ValueError(f"Unknown condition {condition!r}.")
        sel = tp.xs(condition, level="condition")
        colors = (sel.loc[cell_line] if cell_line is not None else sel.mean()).to_numpy()
    nodes = nx.draw_networkx_nodes(
        digraph, pos, ax=ax, node_color=colors, cmap="Reds", vmin=0, vmax=1, edgecolors="k"
    )
    nx.draw_networkx_labels(
        digraph, pos, ax=ax, labels={n: n.replace("program_", "") for n in digraph}
    )
    weights = np.array([d["weight"] for *_, d in digraph.edges(data=True)])
    if len(weights):
        nx.draw_networkx_edges(
            digraph,
            pos,
            ax=ax,
            width=0.5 + 4 * np.abs(weights) / np.abs(weights).max(),
            edge_color=["tab:red" if w > 0 else "tab:blue" for w in weights],
            arrows=True,
            arrowsize=12,
            connectionstyle="arc3,rad=0.1",
        )
    if condition is not None:
        plt.colorbar(nodes, ax=ax, label=f"P(target) of {condition}", shrink=0.7)
    ax.set_title("learned program graph (red: +, blue: −)")
    ax.set_axis_off()
    return _finish(ax, show, save)


def dose_response(
    model,
    condition: str,
    programs: Sequence[str] | None = None,
    cell_line: str | None = None,
    dose_range: tuple[float, float] | None = None,
    n_top: int = 3,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Learned intervention strength per program across doses, training doses marked.

    Parameters
    ----------
    model
        A trained :class:`~gim_scvi.GIM` set up with a ``dose_key``.
    condition
        A perturbation of the model's AnnData.
    programs
        Programs to draw (default: the ``n_top`` with the largest shift).
    cell_line
        Cell line (default: the first one the perturbation was observed in).
    dose_range
        ``(low, high)`` doses (default: a decade beyond the training doses on each side).
    n_top
        Number of programs drawn when ``programs`` is None.
    ax, show, save
        Matplotlib Axes to draw into; show / save the figure.
    """
    if not model.module.has_dose:
        raise ValueError("The model was set up without `dose_key`: there is no dose response.")
    adata = model.adata
    names = model._perturbation_names(adata)
    rows = np.flatnonzero(names == condition)
    if rows.size == 0:
        raise ValueError(f"Unknown condition {condition!r}.")
    lines = np.asarray(model.cell_lines)[model._cell_line_codes(adata)]
    line = cell_line or str(lines[rows[0]])
    treated = ~model._control_mask(adata)
    train_doses = np.unique(model._doses(adata)[treated])
    if dose_range is None:
        dose_range = (train_doses.min() / 10, train_doses.max() * 10)
    grid = np.geomspace(*dose_range, 100).astype(np.float32)
    feats = np.repeat(model._features(adata)[rows[:1]][:, None, :], len(grid), axis=0)
    out = model._intervention_tensors(
        feats, grid[:, None], np.full(len(grid), model.cell_lines.index(line)), "mean"
    )
    shift = pd.DataFrame(out["shift"].cpu().numpy(), columns=model.program_names)
    if programs is None:
        programs = shift.abs().max().sort_values(ascending=False).index[:n_top].tolist()
    ax = _new_ax(ax, (5, 3.5))
    for program in programs:
        ax.plot(grid, shift[program], label=program)
    for d in train_doses:
        ax.axvline(d, color="grey", lw=0.6, ls=":")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("dose (dotted: training doses)")
    ax.set_ylabel("expected shift of the program")
    ax.set_title(f"{condition} in {line}")
    ax.legend(frameon=False, fontsize="small")
    return _finish(ax, show, save)


def predicted_vs_observed(
    model,
    adata: AnnData,
    condition: str,
    dose: float | None = None,
    cell_line: str | None = None,
    n_degs: int = 50,
    n_cells: int = 200,
    mode: str = "mean",
    seed: int = 0,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Predicted vs observed mean change on a condition's top DEGs, R² in the title.

    Parameters
    ----------
    model
        A trained :class:`~gim_scvi.GIM`.
    adata
        AnnData with the real cells of the condition and the line's controls.
    condition
        A perturbation in ``adata`` (typically held out).
    dose
        Its dose (default: the highest observed).
    cell_line
        The cell line (default: the first one observed).
    n_degs
        DEGs shown (scanpy t-test against the line's controls, by ``|score|``).
    n_cells, mode, seed
        Passed to :meth:`~gim_scvi.GIM.predict`.
    ax, show, save
        Matplotlib Axes to draw into; show / save the figure.
    """
    from gim_scvi.tl._evaluate import condition_deltas
    from gim_scvi.tl._metrics import r2_score_means

    prof = condition_deltas(model, adata, condition, dose, cell_line, n_degs, n_cells, mode, seed)
    obs, pred = prof["observed_delta"], prof["predicted_delta"]
    r2 = r2_score_means(prof["observed_mean"], prof["predicted_mean"])
    ax = _new_ax(ax, (4, 4))
    ax.scatter(obs, pred, s=12, alpha=0.8)
    lim = float(np.nanmax(np.abs(np.concatenate([obs, pred])))) * 1.05 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("observed change vs control (log1p)")
    ax.set_ylabel("predicted change vs control (log1p)")
    ax.set_title(f"{condition}, {prof['dose']:g}, {prof['cell_line']}: DEG R² = {r2:.2f}")
    return _finish(ax, show, save)


def programs(
    model,
    programs: Sequence[str] | None = None,
    n_genes: int = 10,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Top genes of each program by loading (one small bar chart per program).

    Parameters
    ----------
    model
        A trained :class:`~gim_scvi.GIM`.
    programs
        Programs to show (default: all).
    n_genes
        Genes per program.
    show, save
        Show / save the figure.

    Returns
    -------
    numpy.ndarray or None
        Array of Axes when ``show=False``.
    """
    import matplotlib.pyplot as plt

    loadings = model.get_gene_programs()
    programs = list(programs) if programs is not None else list(loadings.columns)
    unknown = sorted(set(programs) - set(loadings.columns))
    if unknown:
        raise ValueError(f"Unknown program(s) {unknown}; the model has {list(loadings.columns)}.")
    n_cols = min(4, len(programs))
    n_rows = int(np.ceil(len(programs) / n_cols))
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(3.2 * n_cols, 0.25 * n_genes * n_rows + 1), squeeze=False
    )
    for ax, program in zip(axes.flat, programs, strict=False):
        top = loadings[program].sort_values(ascending=False).head(n_genes)[::-1]
        ax.barh(top.index, top.to_numpy(), color="tab:blue")
        ax.set_title(program, fontsize="small")
        ax.tick_params(labelsize="x-small")
    for ax in axes.flat[len(programs) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return _finish(axes, show, save)


METRIC_LABELS = {
    "r2_all": "R² of means, all genes",
    "r2_all_clipped": "R² of means, all genes (clipped at 0)",
    "r2_deg": "R² of means, top DEGs",
    "r2_deg_clipped": "R² of means, top DEGs (clipped at 0)",
    "pearson_delta_all": "Pearson of changes, all genes",
    "pearson_delta_deg": "Pearson of changes, top DEGs",
    "energy_distance": "energy distance (lower is better)",
}


def evaluation(
    results: pd.DataFrame | AnnData,
    metric: str = "r2_deg",
    doses: str = "highest",
    key: str = "gim_eval",
    clip_lower: float | None = None,
    ax=None,
    show: bool | None = None,
    save: str | Path | None = None,
):
    """Per-condition scores of GIM and the baselines, one box and its points per method.

    Each point is one held-out condition (perturbation x dose x cell line); the box spans the
    quartiles with the median in black, the diamond is the method's mean, and the number under
    its name counts the conditions with a defined value.

    Parameters
    ----------
    results
        The table of :func:`gim_scvi.tl.evaluate`, or an AnnData it wrote to
        ``.uns[key]`` (``key_added``).
    metric
        A score column of the table, e.g. ``"r2_deg"``, ``"pearson_delta_deg"`` or
        ``"energy_distance"``.
    doses
        ``"highest"``: conditions at the highest dose (the headline comparison, as in
        :func:`gim_scvi.tl.summarize`); ``"all"``: every condition.
    key
        Key of ``.uns`` when ``results`` is an AnnData.
    clip_lower
        Draw values below this at it (as triangles), so that a few very negative R² do not
        squeeze the rest; the means are of the unclipped values (one below it is not drawn).
    ax, show, save
        Matplotlib Axes to draw into; show / save the figure.
    """
    from gim_scvi.tl._evaluate import conditions_at

    table = _evaluation_table(results, key)
    if metric not in table or metric not in METRIC_LABELS:
        raise ValueError(f"Unknown metric {metric!r}; choose from {sorted(METRIC_LABELS)}.")
    table = conditions_at(table, doses).dropna(subset=[metric])
    if table.empty:
        raise ValueError(f"No defined value of {metric!r} to plot.")
    methods = sorted(table["method"].unique(), key=lambda m: (m != "GIM", m))
    values = [table.loc[table["method"] == m, metric].to_numpy(float) for m in methods]
    ax = _new_ax(ax, (1.2 + 1.1 * len(methods), 4))
    rng = np.random.default_rng(0)
    shown = [v if clip_lower is None else np.maximum(v, clip_lower) for v in values]
    ax.boxplot(
        shown,
        positions=range(len(methods)),
        widths=0.5,
        showfliers=False,
        medianprops={"color": "black"},
    )
    for i, (raw, drawn) in enumerate(zip(values, shown, strict=True)):
        x = i + rng.uniform(-0.15, 0.15, len(raw))
        clipped = raw < drawn
        ax.scatter(x[~clipped], drawn[~clipped], s=10, alpha=0.6, color="C0", zorder=3)
        ax.scatter(x[clipped], drawn[clipped], s=16, marker="v", color="C3", zorder=3)
        mean = raw.mean()
        if clip_lower is None or mean >= clip_lower:
            ax.scatter([i], [mean], s=50, marker="D", color="C1", zorder=4)
    ax.set_xticks(range(len(methods)))
    names = [m.replace("_", "\n") for m in methods]  # "nearest_drug" -> two short lines
    ax.set_xticklabels([f"{m}\n(n={len(v)})" for m, v in zip(names, values, strict=True)])
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title("held-out conditions, " + ("highest dose" if doses == "highest" else "all doses"))
    return _finish(ax, show, save)


def _evaluation_table(results: pd.DataFrame | AnnData, key: str) -> pd.DataFrame:
    """The per-condition table of :func:`gim_scvi.tl.evaluate` from a table or an AnnData."""
    if isinstance(results, AnnData):
        if key not in results.uns or "results" not in results.uns[key]:
            raise KeyError(
                f"adata.uns[{key!r}] holds no evaluation: run "
                f"gim_scvi.tl.evaluate(..., key_added={key!r}) first."
            )
        return pd.DataFrame(results.uns[key]["results"])
    return results
