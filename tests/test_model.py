import hashlib

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch

import gim_scvi
from gim_scvi._constants import GIM_REGISTRY_KEYS as KEYS
from tests.conftest import make_small, setup


def _hash(x) -> str:
    if sp.issparse(x):
        x = x.tocsr()
        parts = [x.data, x.indices, x.indptr]
    else:
        parts = [np.ascontiguousarray(x)]
    h = hashlib.sha256()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def test_registry_contents(small_adata):
    model = gim_scvi.GIM(small_adata, n_programs=3)
    fields = set(model.registry_["field_registries"])
    assert {
        KEYS.X_KEY,
        KEYS.FEATURES_KEY,
        KEYS.DOSE_KEY,
        KEYS.CONTROL_KEY,
        KEYS.CELL_LINE_KEY,
    } <= fields
    assert model.summary_stats[f"n_{KEYS.FEATURES_KEY}"] == 8
    assert model.cell_lines == ["line_A", "line_B"]
    assert model.registry_["setup_args"]["features_key"] == "drug_features"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gene_likelihood="nb"),
        dict(gene_likelihood="zinb"),
        dict(gene_likelihood="poisson"),
        dict(decoder="mlp"),
        dict(graph="cyclic"),
        dict(graph="none"),
        dict(intervention="shift+scale"),
    ],
)
def test_training_smoke(small_adata, kwargs):
    model = gim_scvi.GIM(small_adata, n_programs=3, **kwargs)
    # every stage runs under each option; the second one with fewer steps than its default
    model.train(
        max_epochs=2,
        batch_size=64,
        enable_progress_bar=False,
        generator_refit_steps=100,
        graph_refit_kwargs={"n_steps": 500},
    )
    history = model.history
    for term in (
        "reconstruction_loss_train",
        "kl_local_train",
        "kl_global_train",
        "acyclicity_train",
        "kl_targets_train",
        "kl_z_train",
    ):
        assert term in history, term
    assert np.isfinite(history["elbo_train"].to_numpy(dtype=float)).all()
    pred = model.predict(features=small_adata.obsm["drug_features"][-1:], doses=100.0, n_cells=5)
    assert pred.n_obs == 5 * 2
    assert np.isfinite(pred.layers["expected"]).all()


def test_normal_likelihood_on_lognormalised_data():
    adata = make_small()
    adata.layers["counts"] = adata.X.copy()
    adata.X = gim_scvi.tl.lognorm(adata.X)
    setup(adata)
    with pytest.raises(ValueError, match="gene_likelihood='normal'"):
        gim_scvi.GIM(adata, n_programs=3)
    model = gim_scvi.GIM(adata, n_programs=3, gene_likelihood="normal")
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    pred = model.predict(features=adata.obsm["drug_features"][-1:], doses=100.0, n_cells=4)
    assert not sp.issparse(pred.X)


def test_dag_is_exactly_acyclic(trained):
    import networkx as nx

    model, _ = trained
    w = model.get_causal_graph().to_numpy()
    assert nx.is_directed_acyclic_graph(nx.DiGraph((w != 0).astype(int)))
    assert np.all(np.diag(w) == 0)
    assert set(model.graph_pruning_) == {"removed_small", "removed_on_cycles"}


def test_heldout_cells_never_trained_on(trained):
    model, adata = trained
    split = adata.obs["split"].to_numpy()
    train_idx = np.asarray(model.train_indices)
    assert set(split[train_idx]) == {"train"}
    assert set(np.asarray(model.validation_indices)) == set(np.flatnonzero(split == "valid"))
    assert set(np.asarray(model.test_indices)) == set(np.flatnonzero(split == "test"))
    assert len(train_idx) + len(model.validation_indices) + len(model.test_indices) == adata.n_obs
    # the validation drugs are scored every epoch (model selection on unseen drugs)
    assert len(model.history["elbo_validation"]) == 3


def test_predict_unseen_and_combination(trained):
    model, adata = trained
    rng = np.random.default_rng(1)
    new = rng.normal(size=(2, 8)).astype(np.float32)  # features never seen
    pred = model.predict(
        features=new,
        doses=[10.0, 1000.0],
        conditions=["new_a", "new_b"],
        cell_lines="line_B",
        n_cells=7,
    )
    assert pred.n_obs == 14
    assert list(pred.obs["condition"].unique()) == ["new_a", "new_b"]
    assert set(pred.obs["cell_line"]) == {"line_B"}
    assert pred.obs["dose"].tolist() == [10.0] * 7 + [1000.0] * 7
    assert pred.obs["source_cell"].isin(adata.obs_names[adata.obs["control"]]).all()
    assert sp.issparse(pred.X) and np.all(pred.X.data == np.round(pred.X.data))
    assert pred.obsm["X_gim"].shape == (14, 4)
    assert pred.var_names.equals(adata.var_names)

    combo = np.stack([new, new[::-1]], axis=1)  # (2 conditions, 2 components, P)
    out = model.predict(
        features=combo,
        doses=[[10.0, 10.0], [1000.0, 10.0]],
        cell_lines="line_A",
        n_cells=3,
        mode="mean",
    )
    assert out.obs["dose"].iloc[0] == "10+10"
    # composition: shifts of the components add up
    single = model._intervention_tensors(
        new[:, None], np.array([[10.0], [10.0]], np.float32), np.zeros(2, int), "mean"
    )
    pair = model._intervention_tensors(
        combo[:1], np.array([[10.0, 10.0]], np.float32), np.zeros(1, int), "mean"
    )
    assert np.allclose(pair["shift"].numpy(), single["shift"].numpy().sum(0), atol=1e-5)
    p = single["target_probs"].numpy()
    assert np.allclose(pair["target_probs"].numpy(), 1 - (1 - p[0]) * (1 - p[1]), atol=1e-5)


def test_predict_is_deterministic_and_sample_mode_seeded(trained):
    model, adata = trained
    feats = adata.obsm["drug_features"][-1:]
    a = model.predict(features=feats, doses=100.0, n_cells=5, seed=3)
    b = model.predict(features=feats, doses=100.0, n_cells=5, seed=3)
    assert np.array_equal(a.layers["expected"], b.layers["expected"])
    assert (a.X != b.X).nnz == 0
    s1 = model.predict(features=feats, doses=100.0, n_cells=50, mode="sample", seed=1)
    s2 = model.predict(features=feats, doses=100.0, n_cells=50, mode="sample", seed=1)
    assert np.array_equal(s1.layers["expected"], s2.layers["expected"])


def test_getters_and_targets_adata(trained):
    model, adata = trained
    targets = model.get_intervention_targets()
    assert list(targets.index.names) == ["condition", "cell_line"]
    assert targets.shape[1] == 4
    assert ((targets >= 0) & (targets <= 1)).all().all()
    assert "control" not in targets.index.get_level_values("condition")
    programs = model.get_gene_programs()
    assert programs.shape == (adata.n_vars, 4) and (programs.to_numpy() >= 0).all()
    tad = model.targets_to_adata()
    assert tad.n_vars == 4 and {"condition", "cell_line"} <= set(tad.obs.columns)


def test_annotate_writes_keys_and_keeps_data(trained):
    model, _ = trained
    adata = make_small()
    adata.layers["counts"] = adata.X.copy()
    setup(adata)
    before = {"X": _hash(adata.X), "counts": _hash(adata.layers["counts"])}
    obs_before = adata.obs.copy()
    gim_scvi.tl.annotate(model, adata, key_added="gim")
    assert _hash(adata.X) == before["X"] and _hash(adata.layers["counts"]) == before["counts"]
    pd.testing.assert_frame_equal(adata.obs[obs_before.columns], obs_before)
    assert adata.obsm["X_gim"].shape == (adata.n_obs, 4)
    assert adata.varm["gim_programs"].shape == (adata.n_vars, 4)
    assert adata.layers["gim_predicted"].shape == adata.shape
    assert adata.layers["gim_basal"].shape == adata.shape
    uns = adata.uns["gim"]
    for key in (
        "params",
        "targets",
        "shifts",
        "total_effects",
        "graph",
        "predicted_shift",
        "conditions",
    ):
        assert key in uns, key
    assert uns["predicted_shift"].shape[1] == adata.n_vars
    assert uns["targets"].index.equals(uns["predicted_shift"].index)
    assert "scvi-tools" in uns["params"]["versions"]
    # controls: the basal counterfactual equals the prediction
    ctrl = adata.obs["control"].to_numpy()
    assert np.allclose(adata.layers["gim_predicted"][ctrl], adata.layers["gim_basal"][ctrl])
    return adata


def test_annotated_adata_round_trips_h5ad(trained, tmp_path):
    import anndata as ad

    model, _ = trained
    adata = setup(make_small())
    gim_scvi.tl.annotate(model, adata)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(back.uns["gim"]["targets"], adata.uns["gim"]["targets"])


def test_save_load_identical(trained, tmp_path):
    model, adata = trained
    feats = adata.obsm["drug_features"][-2:]
    before = model.predict(features=feats, doses=[10.0, 1000.0], n_cells=6, seed=2)
    model.save(tmp_path / "m", overwrite=True)
    loaded = gim_scvi.GIM.load(tmp_path / "m", adata=adata)
    after = loaded.predict(features=feats, doses=[10.0, 1000.0], n_cells=6, seed=2)
    assert np.array_equal(before.layers["expected"], after.layers["expected"])
    assert (before.X != after.X).nnz == 0
    pd.testing.assert_frame_equal(model.get_causal_graph(), loaded.get_causal_graph())
    bare = gim_scvi.GIM.load(tmp_path / "m", adata=False)
    pd.testing.assert_frame_equal(
        model.get_intervention_targets(features=feats, conditions=["a", "b"]),
        bare.get_intervention_targets(features=feats, conditions=["a", "b"]),
    )
    pd.testing.assert_frame_equal(model.get_gene_programs(), bare.get_gene_programs())
    # without any AnnData, basal cells come from the prior, with realistic library sizes
    from_prior = bare.predict(features=feats, doses=[10.0, 1000.0], n_cells=30, seed=1)
    assert from_prior.n_obs == 2 * 30 * 2
    assert from_prior.obs["source_cell"].str.startswith("prior_").all()
    assert from_prior.var_names.equals(adata.var_names)
    lib_pred = np.median(np.asarray(from_prior.X.sum(1)).ravel())
    lib_real = np.median(np.asarray(adata.X.sum(1)).ravel())
    assert 0.5 < lib_pred / lib_real < 2.0


def test_clear_errors(small_adata, trained):
    adata = make_small()
    with pytest.raises(KeyError, match="drug_feats"):
        setup(adata, features_key="drug_feats")
    bad = make_small()
    bad.obsm["drug_features"][5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        setup(bad)
    with pytest.raises(KeyError, match="cell_type"):
        setup(make_small(), cell_line_key="cell_type")
    model, _ = trained
    with pytest.raises(ValueError, match=r"\(n_conditions, 8\)"):
        model.predict(features=np.ones((2, 5)), doses=10.0)
    with pytest.raises(ValueError, match="Unknown cell line"):
        model.predict(features=np.ones((1, 8)), doses=10.0, cell_lines="HeLa")
    with pytest.raises(ValueError, match="pass `doses`"):
        model.predict(features=np.ones((1, 8)))
    with pytest.raises(ValueError, match="No cell has"):
        model2 = gim_scvi.GIM(small_adata, n_programs=3)
        model2.train(max_epochs=1, split_key="split", train_split="training")


def test_duplicate_names_and_empty_data_are_refused():
    adata = make_small()
    adata.obs_names = ["same"] * adata.n_obs
    with pytest.raises(ValueError, match="obs_names_make_unique"):
        setup(adata)
    adata = make_small()
    adata.var_names = ["g"] * adata.n_vars
    with pytest.raises(ValueError, match="var_names_make_unique"):
        setup(adata)
    with pytest.raises(ValueError, match="empty"):
        setup(make_small()[:0].copy())


def test_bad_doses_and_control_column():
    adata = make_small()
    adata.obs.loc[adata.obs_names[~adata.obs["control"]][0], "dose"] = 0.0
    with pytest.raises(ValueError, match="positive number"):
        setup(adata)
    adata = make_small()
    adata.obs["control"] = np.where(adata.obs["control"], "yes", "no")
    with pytest.raises(TypeError, match="boolean or 0/1"):
        setup(adata)


def test_zero_feature_rows_are_controls_without_flag():
    scvi.settings.seed = 0
    adata = setup(make_small(), control_key=None)
    model = gim_scvi.GIM(adata, n_programs=3)
    assert model._control_mask(adata).sum() == adata.obs["control"].sum()


def test_constant_training_features_are_not_blown_up(small_adata):
    small_adata.obsm["drug_features"][:, 0] = np.where(
        small_adata.obs["control"].to_numpy(), 0.0, 1.0
    )  # a bit that every training drug sets
    small_adata.obsm["drug_features"][:, 1] = 0.0  # a bit that no drug sets
    model = gim_scvi.GIM(small_adata, n_programs=3)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert float(model.module.feature_std[0]) == 1.0
    assert float(model.module.feature_std[1]) == 1.0
    new = np.ones((1, 8), np.float32)
    pred = model.predict(features=new, doses=10.0, n_cells=3)
    assert np.isfinite(pred.layers["expected"]).all()


@pytest.mark.parametrize("binary_features", ["standardize", "center"])
def test_binary_feature_columns_centred_not_scaled(small_adata, tmp_path, binary_features):
    feats = small_adata.obsm["drug_features"]
    treated = ~small_adata.obs["control"].to_numpy()
    feats[:, 2] = np.where(treated & (feats[:, 3] > 0), 1.0, 0.0)  # a bit some drugs set
    assert 0 < feats[treated, 2].mean() < 1
    model = gim_scvi.GIM(small_adata, n_programs=3, binary_features=binary_features)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False, generator_refit_steps=0)
    std = model.module.feature_std.numpy()
    assert std[2] == 1.0 if binary_features == "center" else 0 < std[2] < 0.51
    assert float(model.module.feature_mean[2]) == pytest.approx(feats[treated, 2].mean(), 1e-5)
    continuous = [j for j in range(feats.shape[1]) if j != 2]
    np.testing.assert_allclose(std[continuous], feats[treated][:, continuous].std(0), 1e-4)
    model.save(tmp_path / "m")
    loaded = gim_scvi.GIM.load(tmp_path / "m", adata=small_adata)
    assert loaded.binary_features == binary_features


def test_feature_components_whiten_the_training_perturbations(small_adata, tmp_path):
    model = gim_scvi.GIM(small_adata, n_programs=3, feature_components=3, ensemble_layers=1)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    module = model.module
    assert module.feature_projection.shape == (8, 3)
    assert module.generator.members[0].mlp is not None
    inputs = module.standardise_features(module.seen_features).double()
    centred = inputs - inputs.mean(0)
    covariance = centred.T @ centred / (inputs.shape[0] - 1)
    np.testing.assert_allclose(covariance.numpy(), np.eye(3), atol=1e-4)
    pred = model.predict(features=np.ones((1, 8), np.float32), doses=10.0, n_cells=3)
    assert np.isfinite(pred.layers["expected"]).all()
    model.save(tmp_path / "m")
    loaded = gim_scvi.GIM.load(tmp_path / "m", adata=small_adata)
    torch.testing.assert_close(loaded.module.feature_projection, module.feature_projection)


def test_feature_components_beyond_the_data_are_zero(small_adata):
    with pytest.raises(ValueError, match="feature_components=0"):
        gim_scvi.GIM(small_adata, feature_components=0)
    model = gim_scvi.GIM(small_adata, n_programs=3, feature_components=20)  # 8 columns
    assert model.module.feature_projection.shape == (8, 8)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)  # 8 drugs: rank 7
    inputs = model.module.standardise_features(model.module.seen_features)
    np.testing.assert_allclose(inputs.std(0).numpy(), [1.0] * 7 + [0.0], atol=1e-4)


def test_binary_features_value_is_checked(small_adata):
    with pytest.raises(ValueError, match="binary_features='scale'"):
        gim_scvi.GIM(small_adata, binary_features="scale")


def test_generator_weight_decay_and_lr_schedule(small_adata):
    model = gim_scvi.GIM(small_adata, n_programs=3)
    model.train(
        max_epochs=2,
        batch_size=64,
        enable_progress_bar=False,
        split_key="split",
        validation_split="valid",
        plan_kwargs={"generator_weight_decay": 0.05, "reduce_lr_on_plateau": True},
        generator_refit_steps=0,  # the plan's optimiser is the joint stage's
    )
    plan = gim_scvi.model.GIMTrainingPlan(
        model.module, generator_weight_decay=0.05, loadings_lr_factor=4.0
    )
    groups = plan.configure_optimizers()["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [plan.weight_decay, 0.05, plan.weight_decay]
    assert [g["lr"] for g in groups] == [plan.lr, plan.lr, 4.0 * plan.lr]
    module = model.module
    n_generator = sum(1 for _ in module.joint_generator.parameters())
    n_generator += sum(1 for _ in module.generator.parameters())  # the ensemble (default)
    assert len(groups[1]["params"]) == n_generator
    assert groups[2]["params"] == [module.decoder.loadings_raw]
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in module.parameters())  # each exactly once
    with pytest.raises(ValueError, match="loadings_lr_factor"):
        gim_scvi.model.GIMTrainingPlan(model.module, loadings_lr_factor=0.0)


def test_predict_iter_chunks_equal_one_predict(trained):
    """Streaming predictions in chunks gives exactly the cells of one predict call."""
    model, _ = trained
    feats = np.random.default_rng(1).normal(size=(5, model.module.feature_mean.shape[0]))
    kwargs = dict(features=feats, doses=[10.0, 100.0, 1000.0, 10.0, 50.0], n_cells=7, seed=3)
    whole = model.predict(**kwargs)
    chunks = list(model.predict_iter(**kwargs, conditions_per_chunk=2))
    assert [c.obs["condition"].nunique() for c in chunks] == [2, 2, 1]
    # expected values only (decoded in batches across conditions) are the same numbers
    means = model.predict(**kwargs, sample_counts=False, batch_size=16)
    assert np.array_equal(means.obs["source_cell"], whole.obs["source_cell"])
    assert np.allclose(means.X, whole.layers["expected"], rtol=1e-5)
    assert means.layers["expected"] is means.X or np.array_equal(means.layers["expected"], means.X)
    assert sum(c.n_obs for c in chunks) == whole.n_obs

    def cells(pred, cond, line):
        mask = (pred.obs["condition"] == cond).to_numpy() & (pred.obs["cell_line"] == line)
        return pred.X[mask.to_numpy()].toarray(), pred.layers["expected"][mask.to_numpy()]

    for cond in whole.obs["condition"].unique():
        chunk = next(c for c in chunks if cond in set(c.obs["condition"]))
        for line in model.cell_lines:
            (x_whole, e_whole), (x_chunk, e_chunk) = (
                cells(whole, cond, line),
                cells(chunk, cond, line),
            )
            assert x_whole.shape[0] == 7
            # same control cells and random streams; batched float rounding may differ
            assert np.allclose(e_whole, e_chunk, rtol=1e-5)
            assert np.mean(x_whole == x_chunk) > 0.99


def test_targets_of_seen_perturbations_without_effect_come_from_features(trained, monkeypatch):
    model, _ = trained
    module = model.module
    original = module.intervention
    frame = model._registered_conditions(None).drop_duplicates("condition").set_index("condition")
    with_effect = torch.as_tensor(np.asarray(frame.loc["drug_000", "features"]))

    def crafted(features, dose, cell_line, mode="relaxed", generator=None, use_seen=True):
        """Fit to own cells: drug_000 targets program 0, other seen drugs nothing;
        feature-based generator: program 1 for every row."""
        out = dict(original(features, dose, cell_line, mode=mode, generator=generator))
        by_features = torch.full_like(out["target_probs"], 0.05)
        by_features[:, 1] = 0.8
        own = torch.full_like(by_features, 0.2)
        own[(features == with_effect).all(1), 0] = 0.9
        seen = module.seen_rows(features)[:, None] & use_seen
        out["target_probs"] = torch.where(seen, own, by_features)
        return out

    monkeypatch.setattr(module, "intervention", crafted)
    reported = model.get_intervention_targets().groupby(level="condition").mean()
    own_cells = model.get_intervention_targets(no_effect="cells").groupby(level="condition").mean()
    seen = module.seen_rows(torch.as_tensor(np.stack(frame["features"].to_list()))).numpy()
    seen = pd.Series(seen, index=frame.index).loc[reported.index]
    assert seen["drug_000"] and seen.sum() >= 2 and not seen.all()
    np.testing.assert_allclose(reported.loc["drug_000"], [0.9, 0.2, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(own_cells.loc["drug_000"], [0.9, 0.2, 0.2, 0.2], rtol=1e-6)
    for drug in seen.index.drop("drug_000"):  # seen without effect, or never seen
        np.testing.assert_allclose(reported.loc[drug], [0.05, 0.8, 0.05, 0.05], rtol=1e-6)
        expected = [0.2] * 4 if seen[drug] else [0.05, 0.8, 0.05, 0.05]
        np.testing.assert_allclose(own_cells.loc[drug], expected, rtol=1e-6)
    conditions = model.get_interventions()["conditions"]
    flagged = conditions.groupby("condition", observed=True)["targets_from_features"].all()
    expected_flags = seen & (seen.index != "drug_000")
    pd.testing.assert_series_equal(
        flagged.loc[expected_flags.index], expected_flags, check_names=False
    )
    with pytest.raises(ValueError, match="no_effect"):
        model.get_intervention_targets(no_effect="prior")
