import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import gim_scvi
from tests.conftest import make_small, setup


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _no_files(tmp_path):
    return list(tmp_path.iterdir()) == []


def test_targets_plot(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, adata = trained
    axes = gim_scvi.pl.targets(model, show=False)
    assert "mainplot_ax" in axes
    drugs = sorted(set(adata.obs.loc[~adata.obs["control"], "condition"].astype(str)))
    pathway = pd.Series({d: "A" if i % 2 else "B" for i, d in enumerate(drugs)})
    axes = gim_scvi.pl.targets(model, annotation=pathway, show=False)
    labels = [t.get_text() for t in axes["mainplot_ax"].get_yticklabels()]
    assert set(labels) == {"A", "B"}
    assert _no_files(tmp_path)
    gim_scvi.pl.targets(model.targets_to_adata(), save=tmp_path / "t.png", show=False)
    assert (tmp_path / "t.png").exists()
    with pytest.raises(ValueError, match="Unknown condition"):
        gim_scvi.pl.targets(model, conditions=["nope"], show=False)


def test_causal_graph_plot(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, adata = trained
    drug = str(adata.obs.loc[~adata.obs["control"], "condition"].iloc[0])
    ax = gim_scvi.pl.causal_graph(model, condition=drug, show=False)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert _no_files(tmp_path)
    gim_scvi.pl.causal_graph(model, save=tmp_path / "g.pdf", show=False)
    assert (tmp_path / "g.pdf").exists()


def test_dose_response_plot(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, adata = trained
    drug = str(adata.obs.loc[~adata.obs["control"], "condition"].iloc[0])
    ax = gim_scvi.pl.dose_response(model, drug, n_top=2, show=False)
    assert len(ax.get_lines()) >= 2 + 2  # two programs and the two training doses
    ax = gim_scvi.pl.dose_response(model, drug, programs=["program_0"], show=False)
    assert ax.get_legend_handles_labels()[1] == ["program_0"]
    assert _no_files(tmp_path)
    with pytest.raises(ValueError, match="Unknown condition"):
        gim_scvi.pl.dose_response(model, "nope", show=False)


def test_predicted_vs_observed_plot(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, adata = trained
    drug = str(adata.obs.loc[adata.obs["split"] == "test", "condition"].iloc[0])
    ax = gim_scvi.pl.predicted_vs_observed(model, adata, drug, n_degs=10, n_cells=20, show=False)
    assert "DEG R²" in ax.get_title()
    assert len(ax.collections[0].get_offsets()) == 10
    assert _no_files(tmp_path)


def test_programs_plot(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, _ = trained
    axes = gim_scvi.pl.programs(model, n_genes=5, show=False)
    assert isinstance(axes, np.ndarray) and axes.size >= 4
    assert len(axes.flat[0].patches) == 5
    assert _no_files(tmp_path)
    gim_scvi.pl.programs(model, programs=["program_1"], save=tmp_path / "p.png", show=False)
    assert (tmp_path / "p.png").exists()
    with pytest.raises(ValueError, match="Unknown program"):
        gim_scvi.pl.programs(model, programs=["program_99"], show=False)


def test_annotated_adata_works_with_plain_scanpy(trained):
    import scanpy as sc

    model, _ = trained
    adata = setup(make_small())
    gim_scvi.tl.annotate(model, adata)
    sc.pp.neighbors(adata, use_rep="X_gim", n_neighbors=10)
    sc.tl.umap(adata, random_state=0)
    ax = sc.pl.umap(adata, color="cell_line", show=False)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    assert isinstance(ax, matplotlib.axes.Axes)
    tad = model.targets_to_adata()
    axes = sc.pl.matrixplot(tad, var_names=list(tad.var_names), groupby="condition", show=False)
    assert "mainplot_ax" in axes


def test_evaluation_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = []
    for method, shift in [("ridge", 0.1), ("GIM", 0.3), ("control_mean", 0.0)]:
        for i, dose in enumerate([10.0, 1000.0] * 3):
            value = -50.0 if (method == "ridge" and i == 1) else shift + 0.01 * i
            rows.append(
                {
                    "condition": f"d{i // 2}",
                    "dose": dose,
                    "cell_line": "A",
                    "method": method,
                    "r2_deg": value,
                    "pearson_delta_deg": np.nan if method == "control_mean" else value,
                }
            )
    table = pd.DataFrame(rows)
    ax = gim_scvi.pl.evaluation(table, show=False)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["GIM\n(n=3)", "control\nmean\n(n=3)", "ridge\n(n=3)"]  # GIM first
    # three highest-dose points per method (besides its mean diamond)
    points = [c for c in ax.collections if len(c.get_offsets()) == 3]
    assert len(points) == 3
    assert _no_files(tmp_path)
    # clipping: ridge's -50 is drawn at -1 as a triangle; its mean is below the axis
    ax = gim_scvi.pl.evaluation(table, clip_lower=-1.0, show=False)
    low = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    assert low.min() == -1.0
    # undefined values are left out (the control mean has no Pearson of changes)
    ax = gim_scvi.pl.evaluation(table, metric="pearson_delta_deg", doses="all", show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["GIM\n(n=6)", "ridge\n(n=6)"]
    adata = AnnData(np.zeros((2, 2), dtype=np.float32))  # only .uns matters here
    adata.uns["gim_eval"] = {"results": table}
    gim_scvi.pl.evaluation(adata, save=tmp_path / "e.png", show=False)
    assert (tmp_path / "e.png").exists()
    with pytest.raises(ValueError, match="Unknown metric"):
        gim_scvi.pl.evaluation(table, metric="accuracy", show=False)
    with pytest.raises(KeyError, match="key_added='other'"):
        gim_scvi.pl.evaluation(adata, key="other", show=False)
