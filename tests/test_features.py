"""Per-cell features as distinct rows: equal to numpy.unique, sparse-safe, chunk-invariant."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from conftest import make_small, setup

import gim_scvi
from gim_scvi.model._features import feature_rows


@pytest.fixture
def screen(rng):
    drugs = (rng.random((12, 40)) < 0.2).astype(np.float32)
    x = drugs[rng.integers(0, 12, 5000)]
    x[::5] = 0.0  # controls
    return x


@pytest.mark.parametrize("to_sparse", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 1000, 100_000])
def test_feature_rows_match_numpy_unique(screen, to_sparse, chunk_size):
    rows = feature_rows(sp.csr_matrix(screen) if to_sparse else screen, chunk_size=chunk_size)
    unique, inverse = np.unique(screen, axis=0, return_inverse=True)
    assert np.array_equal(rows.unique, unique)
    assert np.array_equal(rows.inverse, inverse.reshape(-1))
    assert np.array_equal(rows[np.arange(100)], screen[:100])
    assert np.array_equal(rows.zero_rows(), ~screen.any(axis=1))
    treated = screen.any(axis=1)
    mean, std = rows.treated_mean_std(treated)
    ref = screen[treated].astype(np.float64)
    assert np.allclose(mean, ref.mean(0), atol=1e-6)
    assert np.allclose(std, ref.std(0), atol=1e-6)


def test_sparse_features_train_like_dense():
    """Sparse obsm features (e.g. fingerprint bits of a whole screen) are never densified and
    give the model the same statistics and weights as the dense matrix."""
    models = []
    for to_sparse in (False, True):
        adata = make_small()
        if to_sparse:
            adata.obsm["drug_features"] = sp.csr_matrix(adata.obsm["drug_features"])
        setup(adata)
        scvi.settings.seed = 0
        model = gim_scvi.GIM(adata, n_programs=3)
        # a short second stage: it reads the features of each training condition too
        model.train(
            max_epochs=1,
            batch_size=64,
            enable_progress_bar=False,
            generator_refit_steps=30,
            graph_refit_kwargs={"n_steps": 100},
        )
        models.append(model)
    dense, sparse = (m.module.state_dict() for m in models)
    for name in ("feature_mean", "feature_std", "cells_per_context", "log_library_mean"):
        assert np.allclose(dense[name].numpy(), sparse[name].numpy()), name
    assert dense.keys() == sparse.keys()
    for name, value in dense.items():  # graph, ensemble members, seen interventions
        assert np.allclose(value.numpy(), sparse[name].numpy(), atol=1e-6), name


def _smiles_adata(smiles: list[str], control: list) -> anndata.AnnData:
    obs = pd.DataFrame({"smiles": smiles, "control": control})
    obs.index = [f"cell_{i}" for i in range(len(obs))]
    return anndata.AnnData(sp.csr_matrix((len(obs), 3), dtype=np.float32), obs=obs)


def test_featurize_refuses_perturbed_cells_without_smiles():
    adata = _smiles_adata(["CCO", "", "CS(C)=O", "CCN"], [False, False, True, False])
    with pytest.raises(ValueError, match=r"1 cell\(s\) are not controls .*cell_1"):
        gim_scvi.pp.featurize_smiles(adata, control_key="control")
    assert "drug_features" not in adata.obsm
    # without control flags an empty SMILES marks a control, as documented
    gim_scvi.pp.featurize_smiles(adata)
    assert not adata.obsm["drug_features"][1].any()


def test_featurize_reads_string_control_flags():
    adata = _smiles_adata(["CCO", "CS(C)=O", "CCN"], ["False", "True", "False"])
    gim_scvi.pp.featurize_smiles(adata, control_key="control", n_bits=64)
    nonzero = adata.obsm["drug_features"].any(axis=1)
    np.testing.assert_array_equal(nonzero, [True, False, True])
