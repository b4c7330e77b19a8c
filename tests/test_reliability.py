"""Bad input, data safety, persistence and reproducibility."""

import hashlib

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gim_scvi
from gim_scvi.tl import pearson_delta, r2_score_means
from tests.conftest import make_small, setup

FEATURES = 8


def _digest(adata) -> dict[str, str]:
    """Hashes of X, every layer, obs, var and every obsm entry."""

    def h(x) -> str:
        m = hashlib.sha256()
        if sp.issparse(x):
            x = x.tocsr()
            for part in (x.data, x.indices, x.indptr):
                m.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(x, pd.DataFrame):
            m.update(pd.util.hash_pandas_object(x, index=True).to_numpy().tobytes())
            m.update(str(list(x.columns)).encode())
        else:
            m.update(np.ascontiguousarray(x).tobytes())
        return m.hexdigest()

    out = {"X": h(adata.X), "obs": h(adata.obs), "var": h(adata.var)}
    out |= {f"layer:{k}": h(v) for k, v in adata.layers.items()}
    out |= {f"obsm:{k}": h(v) for k, v in adata.obsm.items()}
    return out


# ---------------------------------------------------------------------------- bad input
def test_missing_layer_and_obs_keys():
    with pytest.raises(KeyError, match="layer='counts'"):
        setup(make_small(), layer="counts")
    with pytest.raises(KeyError, match="dose_key='dosage'"):
        setup(make_small(), dose_key="dosage")


def test_features_with_inf_or_wrong_dtype():
    adata = make_small()
    adata.obsm["drug_features"][7, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        setup(adata)
    adata = make_small()
    adata.obsm["drug_features"] = adata.obsm["drug_features"].astype(str)
    with pytest.raises(TypeError, match="numeric"):
        setup(adata)


def test_negative_counts_with_count_likelihood():
    adata = make_small()
    adata.X = adata.X.copy()
    adata.X.data[0] = -1.0
    setup(adata)
    with pytest.raises(ValueError, match="raw counts"):
        gim_scvi.GIM(adata, n_programs=3)


def test_counts_checked_beyond_the_first_cells():
    from gim_scvi._utils import first_non_count_rows

    counts = sp.random(5000, 30, density=0.2, format="csr", random_state=0) * 10
    counts.data = np.ceil(counts.data)
    assert first_non_count_rows(counts) is None
    mixed = counts.tolil()
    mixed[4990:] = np.log1p(counts[4990:].toarray())  # concatenated: counts, then log-normalised
    rows = first_non_count_rows(mixed.tocsr())
    assert rows is not None and rows.stop == 5000  # beyond the first 2,000 rows once read
    adata = make_small()
    x = adata.X.toarray()
    x[-5:] = np.log1p(x[-5:])
    adata.X = sp.csr_matrix(x)
    setup(adata)
    with pytest.raises(ValueError, match="raw counts"):
        gim_scvi.GIM(adata, n_programs=3)


def test_perturbed_cells_without_features_are_refused():
    adata = make_small()
    drug = adata.obs["condition"].cat.categories[1]
    adata.obsm["drug_features"][(adata.obs["condition"] == drug).to_numpy()] = 0.0
    with pytest.raises(ValueError, match=rf"not controls .*all-zero features.*{drug}"):
        setup(adata)


def test_controls_with_features_warn():
    adata = make_small()
    control = adata.obs["control"].to_numpy()
    adata.obsm["drug_features"][control] = 1.0
    with pytest.warns(UserWarning, match="control cell.*non-zero features"):
        setup(adata)


@pytest.mark.parametrize("problem", ["nan", "unused"])
def test_cell_line_labels_missing_or_without_cells(problem):
    adata = make_small()
    lines = adata.obs["cell_line"]
    if problem == "nan":
        values = lines.astype(object).to_numpy()
        values[3] = np.nan
        adata.obs["cell_line"] = pd.Categorical(values)
        match = "missing value"
    else:
        adata.obs["cell_line"] = lines.cat.add_categories(["line_unused"])
        match = r"without any cell: \['line_unused'\].*remove_unused_categories"
    with pytest.raises(ValueError, match=match):
        setup(adata)


@pytest.mark.parametrize("flags", [["True", "False"], [1.0, np.nan]])
def test_control_flags_as_strings_or_missing(flags):
    adata = make_small()
    control = adata.obs["control"].to_numpy()
    adata.obs["control"] = np.where(control, flags[0], flags[1])
    if isinstance(flags[0], str):  # setup registers numbers only: a clear fix
        with pytest.raises(TypeError, match="== 'control'"):
            setup(adata)
        gim_scvi.data.dose_holdout_split(adata, dose=1000.0, control_key="control")
        held = (adata.obs["split_dose"] == "test").to_numpy()
        assert held.any() and not control[held].any()
    else:
        with pytest.raises(ValueError, match="missing value"):
            setup(adata)


def test_nan_dose_for_perturbed_cell():
    adata = make_small()
    adata.obs.loc[adata.obs_names[~adata.obs["control"]][3], "dose"] = np.nan
    with pytest.raises(ValueError, match="dose <= 0 or NaN"):
        setup(adata)


def test_no_control_cells():
    adata = make_small()
    adata = adata[~adata.obs["control"].to_numpy()].copy()
    setup(adata)
    model = gim_scvi.GIM(adata, n_programs=3)
    with pytest.raises(ValueError, match="no control cell"):
        model.train(max_epochs=1, enable_progress_bar=False)


def test_no_control_cells_for_a_predicted_line(trained):
    model, adata = trained
    only_a = adata[~((adata.obs["cell_line"] == "line_B") & adata.obs["control"])].copy()
    with pytest.raises(ValueError, match="No control cells of cell line 'line_B'"):
        model.predict(features=np.ones((1, FEATURES)), doses=10.0, adata=only_a)


def test_condition_with_one_cell():
    scvi.settings.seed = 0
    adata = make_small()
    keep = np.ones(adata.n_obs, bool)
    cells = np.flatnonzero(
        (adata.obs["condition"] == adata.obs["condition"].cat.categories[1]).to_numpy()
    )
    keep[cells[1:]] = False  # this drug now has a single cell
    adata = setup(adata[keep].copy())
    model = gim_scvi.GIM(adata, n_programs=3)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert np.isfinite(model.get_intervention_targets().to_numpy()).all()


def test_unknown_batch_at_predict():
    scvi.settings.seed = 0
    adata = make_small()
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "b1", "b2"))
    setup(adata, batch_key="batch")
    model = gim_scvi.GIM(adata, n_programs=3)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False, generator_refit_steps=0)
    other = make_small()
    other.obs["batch"] = pd.Categorical(["b9"] * other.n_obs)
    with pytest.raises(ValueError, match="b9"):
        model.predict(features=np.ones((1, FEATURES)), doses=10.0, adata=other)


def test_predict_n_cells_must_be_positive(trained):
    model, _ = trained
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n_cells must be a positive"):
            model.predict(features=np.ones((1, FEATURES)), doses=10.0, n_cells=bad)


def test_expected_layer_is_not_x(trained):
    model, _ = trained
    pred = model.predict(
        features=np.ones((1, FEATURES)), doses=10.0, n_cells=5, sample_counts=False
    )
    before = pred.layers["expected"].copy()
    pred.X *= 2.0
    np.testing.assert_array_equal(pred.layers["expected"], before)


def test_evaluate_names_the_split_values(trained):
    model, adata = trained
    with pytest.raises(ValueError, match=r"== 'ood' \(values of perturbed cells: \["):
        gim_scvi.tl.evaluate(model, adata, split_key="split", heldout="ood")
    with pytest.raises(ValueError, match="pass the training cells' value as `train_split`"):
        gim_scvi.tl.evaluate(model, adata, split_key="split", heldout="test", train_split="tr")


def test_prediction_adata_genes_reordered_or_refused(trained):
    model, adata = trained
    feats = np.ones((1, FEATURES), np.float32)
    reference = model.predict(features=feats, doses=10.0, n_cells=5, adata=adata.copy())
    shuffled = adata[:, adata.var_names[::-1]].copy()
    out = model.predict(features=feats, doses=10.0, n_cells=5, adata=shuffled)
    assert out.var_names.equals(adata.var_names)
    assert np.allclose(out.layers["expected"], reference.layers["expected"], atol=1e-5)
    fewer = adata[:, adata.var_names[:-3]].copy()
    with pytest.raises(ValueError, match="3 of the model's 60 genes are missing"):
        model.predict(features=feats, doses=10.0, adata=fewer)
    with pytest.raises(ValueError, match="model's order"):
        gim_scvi.tl.annotate(model, shuffled)


def test_split_column_problems(small_adata):
    model = gim_scvi.GIM(small_adata, n_programs=3)
    with pytest.raises(KeyError, match="split_key='fold'"):
        model.train(max_epochs=1, split_key="fold")
    with pytest.raises(ValueError, match="'validation'"):
        model.train(max_epochs=1, split_key="split", validation_split="validation")


# ---------------------------------------------------------------------------- nothing lost
def test_public_functions_leave_input_untouched(trained):
    model, _ = trained
    adata = setup(make_small())
    adata.layers["counts"] = adata.X.copy()
    before = _digest(adata)
    feats = adata.obsm["drug_features"][-1:]
    model.predict(features=feats, doses=10.0, n_cells=4, adata=adata)
    model.get_intervention_targets(adata=adata)
    model.get_interventions(adata)
    model.targets_to_adata(adata=adata)
    gim_scvi.tl.evaluate(model, adata, n_cells=10, n_degs=5)
    assert _digest(adata) == before
    gim_scvi.tl.annotate(model, adata, key_added="res")
    after = _digest(adata)
    # annotate adds only its own layers / obsm
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"layer:res_predicted", "layer:res_basal", "obsm:X_res"}


def test_save_refuses_overwrite_and_is_atomic(trained, tmp_path):
    model, _ = trained
    target = tmp_path / "model"
    model.save(target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(target)
    model.save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary leftovers
    loaded = gim_scvi.GIM.load(target, adata=False)
    assert loaded.gim_version_ == model.gim_version_


def test_load_names_the_version_that_saved(trained, tmp_path):
    model, _ = trained
    target = tmp_path / "old"
    model.save(target)
    saved = torch.load(target / "model.pt", weights_only=False)
    saved["attr_dict"]["gim_version_"] = "0.0.1"
    saved["model_state_dict"].pop("scm.edge_mask")  # an older layout
    torch.save(saved, target / "model.pt")
    with pytest.raises(RuntimeError, match=r"saved by gim_scvi 0\.0\.1"):
        gim_scvi.GIM.load(target, adata=False)


class _StopAt(pl.Callback):
    def __init__(self, epoch: int, error: type[BaseException]):
        self.epoch, self.error = epoch, error

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise self.error("stop")


def test_interrupted_training_can_be_saved(small_adata, tmp_path):
    model = gim_scvi.GIM(small_adata, n_programs=3)
    with pytest.raises(RuntimeError, match="stop"):
        model.train(
            max_epochs=5,
            batch_size=64,
            enable_progress_bar=False,
            callbacks=[_StopAt(1, RuntimeError)],
        )
    model.save(tmp_path / "after_error")
    loaded = gim_scvi.GIM.load(tmp_path / "after_error", adata=small_adata)
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, loaded.module.state_dict()[key]), key


def test_keyboard_interrupt_leaves_a_usable_model(small_adata, tmp_path):
    model = gim_scvi.GIM(small_adata, n_programs=3)
    try:
        model.train(
            max_epochs=5,
            batch_size=64,
            enable_progress_bar=False,
            callbacks=[_StopAt(1, KeyboardInterrupt)],
        )
    except (KeyboardInterrupt, SystemExit):
        pass
    model.save(tmp_path / "after_interrupt")
    pred = model.predict(features=np.ones((1, FEATURES)), doses=10.0, n_cells=3)
    assert np.isfinite(pred.layers["expected"]).all()


def test_resume_from_checkpoint_dir(small_adata, tmp_path):
    """An interrupted run resumes from its folder: same split, schedules continue."""
    kwargs = dict(
        max_epochs=4,
        batch_size=64,
        enable_progress_bar=False,
        split_key="split",
        validation_split="valid",
        generator_refit_steps=0,  # resuming concerns the joint stage; skip the second
    )
    scvi.settings.seed = 0
    model = gim_scvi.GIM(small_adata, n_programs=3)
    # Lightning turns Ctrl-C into SystemExit after its clean-up
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        model.train(
            checkpoint_dir=tmp_path / "ckpt",
            callbacks=[_StopAt(2, KeyboardInterrupt)],
            **kwargs,
        )
    assert (tmp_path / "ckpt" / "last.ckpt").exists()

    resumed = gim_scvi.GIM(small_adata, n_programs=3)
    resumed.train(checkpoint_dir=tmp_path / "ckpt", **{**kwargs, "max_epochs": None})
    epochs = resumed.history["elbo_train"].index.to_numpy()
    assert epochs.min() >= 2 and epochs.max() == 3  # continued, not restarted
    assert resumed.train_params_["max_epochs"] == 4  # the plan came from the folder
    # the schedules are a function of the progress, so they continue where an uninterrupted
    # 4-epoch run would be
    straight = gim_scvi.GIM(small_adata, n_programs=3)
    straight.train(**kwargs)
    temps = resumed.history["temperature_train"].to_numpy(dtype=float).ravel()
    expected = straight.history["temperature_train"].to_numpy(dtype=float).ravel()[2:]
    assert np.allclose(temps, expected, rtol=1e-4)
    assert temps[0] < model.history["temperature_train"].to_numpy(dtype=float).ravel()[0]


def test_resume_refuses_another_split(small_adata, tmp_path):
    scvi.settings.seed = 0
    model = gim_scvi.GIM(small_adata, n_programs=3)
    model.train(
        max_epochs=1,
        batch_size=64,
        enable_progress_bar=False,
        split_key="split",
        checkpoint_dir=tmp_path,
        generator_refit_steps=0,  # only the checkpoint matters here
    )
    other = gim_scvi.GIM(small_adata, n_programs=3)
    with pytest.raises(ValueError, match="different split"):
        other.train(max_epochs=1, enable_progress_bar=False, checkpoint_dir=tmp_path)


# ---------------------------------------------------------------------------- reproducible
def test_same_seed_same_weights_and_predictions(small_adata):
    def fit():
        scvi.settings.seed = 7
        model = gim_scvi.GIM(small_adata, n_programs=3)
        model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
        return model

    a, b = fit(), fit()
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key]), key
    feats = small_adata.obsm["drug_features"][-1:]
    pa = a.predict(features=feats, doses=10.0, n_cells=5, mode="sample", seed=4)
    pb = b.predict(features=feats, doses=10.0, n_cells=5, mode="sample", seed=4)
    assert np.array_equal(pa.layers["expected"], pb.layers["expected"])


def test_annotate_is_deterministic_and_records_versions(trained):
    model, _ = trained
    a1, a2 = setup(make_small()), setup(make_small())
    gim_scvi.tl.annotate(model, a1)
    gim_scvi.tl.annotate(model, a2)
    assert np.array_equal(a1.layers["gim_predicted"], a2.layers["gim_predicted"])
    versions = a1.uns["gim"]["params"]["versions"]
    assert {"gim_scvi", "scvi-tools", "torch", "anndata"} <= set(versions)
    assert a1.uns["gim"]["params"]["init"]["graph"] == "dag"


def test_same_seed_same_weights_on_larger_batches():
    # large enough minibatches that CPU kernels run multi-threaded
    adata = setup(make_small(n_drugs=6, cells_per_condition=60, n_genes=300, n_features=16))

    def fit():
        scvi.settings.seed = 3
        model = gim_scvi.GIM(adata, n_programs=6)
        # the joint stage's minibatches are what run multi-threaded; the second stage's
        # reproducibility is tested above
        model.train(
            max_epochs=1, batch_size=512, enable_progress_bar=False, generator_refit_steps=0
        )
        return model.module.state_dict()

    a, b = fit(), fit()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ---------------------------------------------------------------------------- properties
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.integers(3, 30), elements=finite))
def test_r2_properties(true):
    if np.ptp(true) < 1e-3:
        return
    assert r2_score_means(true, true) == pytest.approx(1.0)
    assert r2_score_means(true, np.full_like(true, true.mean())) == pytest.approx(0.0, abs=1e-9)
    assert r2_score_means(true, true + 1.0) <= 1.0


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, 12, elements=finite),
    arrays(np.float64, 12, elements=finite),
    st.floats(min_value=0.1, max_value=10),
)
def test_pearson_delta_properties(true, control, scale):
    delta = true - control
    if np.std(delta) < 1e-3:
        return
    pred = control + scale * delta
    assert pearson_delta(true, pred, control) == pytest.approx(1.0, abs=1e-6)
    assert -1.0 - 1e-9 <= pearson_delta(true, control - delta + 0.5, control) <= 1.0 + 1e-9
