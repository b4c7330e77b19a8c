import numpy as np
import pytest
import scvi

import gim_scvi

SMALL = dict(
    n_drugs=8,
    n_heldout_drugs=2,
    n_validation_drugs=1,
    n_cell_lines=2,
    doses=(10.0, 1000.0),
    cells_per_condition=6,
    control_cells_per_line=40,
    n_genes=60,
    n_programs=3,
    n_features=8,
)


def make_small(seed: int = 0, **kwargs):
    return gim_scvi.data.synthetic(**{**SMALL, **kwargs}, seed=seed)


def setup(adata, **kwargs):
    args = dict(
        features_key="drug_features",
        control_key="control",
        dose_key="dose",
        perturbation_key="condition",
        cell_line_key="cell_line",
    )
    gim_scvi.GIM.setup_anndata(adata, **{**args, **kwargs})
    return adata


@pytest.fixture
def small_adata():
    return setup(make_small())


@pytest.fixture(scope="module")
def trained():
    scvi.settings.seed = 0
    adata = setup(make_small())
    model = gim_scvi.GIM(adata, n_programs=4)
    model.train(
        max_epochs=3,
        split_key="split",
        validation_split="valid",
        batch_size=64,
        enable_progress_bar=False,
    )
    return model, adata


@pytest.fixture
def rng():
    return np.random.default_rng(0)
