import numpy as np
import pandas as pd
import pytest

import gim_scvi
from gim_scvi.tl._baselines import (
    Additive,
    MeanShift,
    NearestDose,
    NearestDrug,
    RidgeShift,
    TrainingProfiles,
    similarity,
)
from tests.conftest import make_small, setup


def b_true():
    return np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])


def _profiles():
    # two lines, three drugs with 2-D features, shift = features @ B + log(dose) / 2
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = b_true()
    rows = []
    for line in ("A", "B"):
        for dose in (10.0, 1000.0):
            for f in feats:
                rows.append((f, dose, line, f @ b + 0.5 * np.log(dose)))
    return TrainingProfiles(
        features=np.array([r[0] for r in rows]),
        doses=np.array([r[1] for r in rows]),
        lines=np.array([r[2] for r in rows]),
        deltas=np.array([r[3] for r in rows]),
    )


def test_baselines_known_answers():
    t = _profiles()
    mean = MeanShift().fit(t).predict_delta(np.zeros(2), 1000.0, "A")
    assert np.allclose(mean, t.deltas[(t.lines == "A") & (t.doses == 1000.0)].mean(0))
    # nearest dose when the dose is unseen: 900 -> 1000
    assert np.allclose(MeanShift().fit(t).predict_delta(np.zeros(2), 900.0, "A"), mean)
    near = NearestDrug().fit(t).predict_delta(np.array([0.9, 0.1]), 10.0, "B")
    assert np.allclose(near, np.array([1.0, 0.0, 2.0]) + 0.5 * np.log(10.0))
    ridge = RidgeShift(alphas=(1e-6,)).fit(t)
    # the shift is linear in features and log dose: ridge recovers an unseen drug and dose
    f_new, d_new = np.array([2.0, -1.0]), 100.0
    pred = ridge.predict_delta(f_new, d_new, "A")
    assert np.allclose(pred, f_new @ b_true() + 0.5 * np.log(d_new), atol=1e-3)


def test_nearest_dose_baseline():
    t = _profiles()
    f = np.array([0.0, 1.0])
    expected_at_1000 = f @ b_true() + 0.5 * np.log(1000.0)
    # 500 nM is nearer to 1000 than to 10 on the log scale
    assert np.allclose(NearestDose().fit(t).predict_delta(f, 500.0, "B"), expected_at_1000)
    assert np.allclose(
        NearestDose().fit(t).predict_delta(f, 50.0, "B"), f @ b_true() + 0.5 * np.log(10.0)
    )
    # a perturbation never seen falls back to the most similar one
    near = NearestDose().fit(t).predict_delta(np.array([0.9, 0.1]), 10.0, "B")
    assert np.allclose(near, np.array([1.0, 0.0, 2.0]) + 0.5 * np.log(10.0))


def test_additive_baseline_sums_the_parts_shifts():
    t = _profiles()
    parts = np.array([[1.0, 0.0], [0.0, 1.0]])
    expected = (parts @ b_true()).sum(0) + 2 * 0.5 * np.log(1000.0)
    additive = Additive().fit(t)
    assert np.allclose(additive.predict_delta(parts, 1000.0, "A"), expected)
    # 500 nM: each part at its nearest training dose (1000 nM on the log scale)
    assert np.allclose(additive.predict_delta(parts, 500.0, "B"), expected)
    # a part never trained on falls back to its most similar training drug
    unseen = np.array([[1.0, 0.0], [0.1, 0.9]])
    assert np.allclose(additive.predict_delta(unseen, 1000.0, "A"), expected)


def test_evaluate_combinations(trained, monkeypatch):
    model, adata = trained
    combo = setup(make_small(n_combinations=2))
    truth = combo.uns["ground_truth"]["combinations"]
    asked = {}
    predict = model.predict

    def spy(*args, **kwargs):
        asked.update(kwargs)
        return predict(*args, **kwargs)

    monkeypatch.setattr(model, "predict", spy)
    kw = dict(n_cells=20, n_degs=10, n_pcs=5, energy_cells=30)
    res = gim_scvi.tl.evaluate(model, combo, heldout="combo", **kw)
    assert set(res["condition"]) == set(truth.index)
    assert set(res["method"]) == {"GIM", "control_mean", "mean_shift", "additive"}
    # 2 combinations x 2 doses x 2 lines, 4 methods each
    assert len(res) == 2 * 2 * 2 * 4
    # the model composes the parts' own features, not the summed row of .obsm
    features = asked["features"]
    assert features.shape[1] == 2
    first = list(asked["conditions"]).index(truth.index[0])
    names = combo.obs["condition"].astype(str).to_numpy()
    for j, part in enumerate(truth.iloc[0]):
        own = combo.obsm["drug_features"][np.flatnonzero(names == part)[0]]
        assert np.allclose(features[first, j], own)
    # combination cells change nothing in the scoring of the single held-out drugs
    monkeypatch.undo()
    single = gim_scvi.tl.evaluate(model, adata, **kw)
    with_combos = gim_scvi.tl.evaluate(model, combo, **kw)
    pd.testing.assert_frame_equal(single, with_combos)
    recovery = gim_scvi.tl.ground_truth_recovery(model, combo)
    assert recovery == gim_scvi.tl.ground_truth_recovery(model, adata)
    for key in ("target_auroc", "target_auroc_test", "target_auroc_own_cells", "graph_auroc"):
        assert key in recovery and 0.0 <= recovery[key] <= 1.0


def test_dose_holdout_split():
    adata = make_small()
    gim_scvi.data.dose_holdout_split(adata, dose=1000.0, key_added="split_dose")
    split = adata.obs["split_dose"].astype(str).to_numpy()
    control = adata.obs["control"].to_numpy().astype(bool)
    dose = adata.obs["dose"].to_numpy()
    assert set(split[~control & (dose == 1000.0)]) == {"test"}
    assert set(split[control]) == {"train"}
    assert set(split[~control & (dose != 1000.0)]) == {"train"}
    with pytest.raises(ValueError, match="not a dose"):
        gim_scvi.data.dose_holdout_split(adata, dose=3.0)


def test_evaluate_on_an_unseen_dose(trained):
    model, adata = trained
    adata = adata.copy()
    gim_scvi.data.dose_holdout_split(adata, dose=1000.0, key_added="split_dose")
    res = gim_scvi.tl.evaluate(
        model,
        adata,
        split_key="split_dose",
        baselines=("control_mean", "nearest_dose"),
        n_cells=20,
        n_degs=10,
        n_pcs=5,
        energy_cells=30,
    )
    assert set(res["method"]) == {"GIM", "control_mean", "nearest_dose"}
    assert set(res["dose"].astype(float)) == {1000.0}


def test_tanimoto_similarity():
    a = np.array([[1, 1, 0, 0]])
    b = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]])
    assert np.allclose(similarity(a, b), [[1.0, 1 / 3, 0.0]])


@pytest.fixture(scope="module")
def evaluated(trained):
    model, adata = trained
    return (
        model,
        adata,
        gim_scvi.tl.evaluate(
            model, adata, n_cells=20, n_degs=10, n_pcs=5, energy_cells=30, key_added="gim_eval"
        ),
    )


def test_evaluate_schema_and_uns(evaluated):
    _, adata, res = evaluated
    assert set(res["method"]) == {"GIM", "control_mean", "mean_shift", "nearest_drug", "ridge"}
    for col in (
        "condition",
        "dose",
        "cell_line",
        "n_cells",
        "r2_all",
        "r2_all_clipped",
        "r2_deg",
        "r2_deg_clipped",
        "pearson_delta_all",
        "pearson_delta_deg",
        "energy_distance",
    ):
        assert col in res, col
    test_drugs = set(adata.obs.loc[adata.obs["split"] == "test", "condition"])
    assert set(res["condition"]) == test_drugs
    # 2 drugs x 2 doses x 2 lines conditions, 5 methods each
    assert len(res) == 2 * 2 * 2 * 5
    assert (res["r2_deg_clipped"] >= 0).all()
    assert (res["energy_distance"] >= -1e-9).all()
    summary = adata.uns["gim_eval"]["summary"]
    assert set(summary["doses"]) == {"highest_dose", "all_doses"}
    assert adata.uns["gim_eval"]["params"]["heldout"] == "test"


def test_baselines_never_see_heldout_cells(trained):
    from gim_scvi._utils import context_labels
    from gim_scvi.tl._evaluate import _training_profiles, group_means, lognorm

    model, adata = trained

    def profiles(data):
        lines = data.obs["cell_line"].astype(str).to_numpy()
        control = data.obs["control"].to_numpy()
        names = data.obs["condition"].astype(str).to_numpy()
        context = context_labels(names, data.obs["dose"], lines)
        labels, means = group_means(
            lognorm(data.X), np.where(control, "control | " + lines, context)
        )
        train = (data.obs["split"] == "train").to_numpy() & ~control
        return _training_profiles(
            model._features(data), train, context, dict(zip(labels, means, strict=True))
        )

    tampered = adata.copy()
    held = np.flatnonzero((tampered.obs["split"] != "train").to_numpy())
    x = tampered.X.tolil()
    x[held, :] = 0
    x[held, 0] = 500  # held-out and validation cells now look nothing like before
    tampered.X = x.tocsr()
    a, b = profiles(adata), profiles(tampered)
    assert np.array_equal(a.deltas, b.deltas)
    assert np.array_equal(a.features, b.features)
    for name in ("mean_shift", "nearest_drug", "ridge"):
        ba = gim_scvi.tl._baselines.BASELINES[name]().fit(a)
        bb = gim_scvi.tl._baselines.BASELINES[name]().fit(b)
        f = adata.obsm["drug_features"][held[0]]
        assert np.array_equal(
            ba.predict_delta(f, 10.0, "line_A"), bb.predict_delta(f, 10.0, "line_A")
        )


def test_evaluate_unknown_baseline(trained):
    model, adata = trained
    with pytest.raises(ValueError, match="Unknown baseline"):
        gim_scvi.tl.evaluate(model, adata, baselines=("oracle",))


def test_training_profiles_exclude_heldout():
    from gim_scvi._utils import context_labels
    from gim_scvi.tl._evaluate import _training_profiles, group_means, lognorm

    adata = setup(make_small())
    model = gim_scvi.GIM(adata, n_programs=3)
    split = adata.obs["split"].astype(str).to_numpy()
    control = adata.obs["control"].to_numpy()
    train = (split == "train") & ~control
    names = adata.obs["condition"].astype(str).to_numpy()
    context = context_labels(names, adata.obs["dose"], adata.obs["cell_line"].astype(str))
    labels, means = group_means(
        lognorm(adata.X),
        np.where(control, "control | " + adata.obs["cell_line"].astype(str).to_numpy(), context),
    )
    real = dict(zip(labels, means, strict=True))
    profiles = _training_profiles(model._features(adata), train, context, real)
    test_drugs = set(names[split == "test"])
    assert len(profiles.lines) == len(set(context[train]))
    seen = {tuple(f) for f in profiles.features}
    for drug in test_drugs:
        f = adata.obsm["drug_features"][np.flatnonzero(names == drug)[0]]
        assert tuple(f) not in seen


def test_summarize_counts_conditions_and_skips_undefined_deg_r2():
    rows = [
        # method, dose, r2_deg (NaN: undefined), pearson
        ("GIM", 10.0, 0.2, 0.1),
        ("GIM", 100.0, 0.8, 0.5),
        ("GIM", 100.0, np.nan, 0.3),
        ("ridge", 10.0, 0.0, 0.2),
        ("ridge", 100.0, 0.4, 0.1),
        ("ridge", 100.0, -1.0, np.nan),
    ]
    results = pd.DataFrame(rows, columns=["method", "dose", "r2_deg", "pearson_delta_deg"])
    summary = gim_scvi.tl.summarize(results).set_index(["doses", "method"])
    top = summary.loc[("highest_dose", "GIM")]
    assert top["n_conditions"] == 2 and top["n_r2_deg"] == 1
    assert top["r2_deg_mean"] == pytest.approx(0.8)
    assert summary.loc[("all_doses", "GIM"), "r2_deg_mean"] == pytest.approx(0.5)
    ridge = summary.loc[("highest_dose", "ridge")]
    assert ridge["n_r2_deg"] == 2 and ridge["r2_deg_mean"] == pytest.approx(-0.3)
    assert ridge["pearson_delta_deg_mean"] == pytest.approx(0.1)
    assert summary.loc[("all_doses", "ridge"), "n_conditions"] == 3


def test_evaluate_pooled_dose_degs(trained):
    """``degs="pooled_doses"``: one DEG list per perturbation x line, shared by its doses."""
    from gim_scvi.tl._evaluate import group_means, lognorm, top_degs
    from gim_scvi.tl._metrics import r2_score_means

    model, adata = trained
    kwargs = dict(baselines=("control_mean",), n_cells=20, n_degs=10, n_pcs=5, energy_cells=30)
    pooled = gim_scvi.tl.evaluate(model, adata, degs="pooled_doses", **kwargs)
    per_dose = gim_scvi.tl.evaluate(model, adata, **kwargs)
    cols = ["condition", "dose", "cell_line", "method"]
    assert pooled[cols].equals(per_dose[cols])
    assert np.allclose(pooled["r2_all"], per_dose["r2_all"])  # only the DEG columns change
    assert not np.allclose(pooled["r2_deg"], per_dose["r2_deg"], equal_nan=True)

    # by hand: the control mean's DEG-R² on the DEGs of all held-out doses pooled
    obs = adata.obs
    control = obs["control"].to_numpy()
    held = (obs["split"] == "test").to_numpy() & ~control
    lines = obs["cell_line"].astype(str).to_numpy()
    names = obs["condition"].astype(str).to_numpy()
    rows = np.flatnonzero(held | control)
    expr = lognorm(adata.X[rows])
    pooled_label = np.where(control[rows], "control", names[rows] + " | " + lines[rows])
    degs = top_degs(expr, pooled_label, control[rows], lines[rows], 10)
    dose_label = np.where(
        control[rows],
        "control | " + lines[rows],
        pooled_label + " | " + obs["dose"].astype(str).to_numpy()[rows],
    )
    labels, means = group_means(expr, dose_label)
    mean_of = dict(zip(labels, means, strict=True))
    base = pooled[pooled["method"] == "control_mean"]
    for row in base.itertuples():
        genes = degs[f"{row.condition} | {row.cell_line}"]
        truth = mean_of[f"{row.condition} | {row.cell_line} | {row.dose}"]
        expected = r2_score_means(truth[genes], mean_of[f"control | {row.cell_line}"][genes])
        assert np.isclose(row.r2_deg, expected, atol=1e-5, equal_nan=True)
    # the same lists given by gene name give the same table
    given = {label: adata.var_names[genes] for label, genes in degs.items()}
    from_names = gim_scvi.tl.evaluate(model, adata, degs=given, **kwargs)
    pd.testing.assert_frame_equal(from_names, pooled)
    with pytest.raises(ValueError, match="degs must be"):
        gim_scvi.tl.evaluate(model, adata, degs="drug", **kwargs)
    one_missing = dict(list(given.items())[1:])
    with pytest.raises(KeyError, match="No DEG list"):
        gim_scvi.tl.evaluate(model, adata, degs=one_missing, **kwargs)
    with pytest.warns(UserWarning, match="not among the model's genes"):
        unknown = {k: [*v, "no_such_gene"] for k, v in given.items()}
        gim_scvi.tl.evaluate(model, adata, degs=unknown, **kwargs)


def _table(values: dict[str, list[float]], drugs: list[str], metric: str = "r2_deg"):
    rows = []
    for method, vals in values.items():
        for i, (drug, v) in enumerate(zip(drugs, vals, strict=True)):
            rows.append(
                {
                    "condition": drug,
                    "dose": 1000.0,
                    "cell_line": f"L{i}",
                    "method": method,
                    metric: v,
                }
            )
    return pd.DataFrame(rows)


def test_compare_paired_cluster_bootstrap():
    from gim_scvi.tl._compare import _cluster_bootstrap_means

    drugs = ["a", "a", "b", "b"]
    table = _table({"GIM": [0.5, 0.6, 0.7, 0.8], "ridge": [0.4, 0.5, 0.6, 0.7]}, drugs)
    out = gim_scvi.tl.compare(table).set_index("method")
    assert out.loc["ridge", "difference"] == pytest.approx(0.1)
    assert out.loc["ridge", ["ci_low", "ci_high"]].tolist() == pytest.approx([0.1, 0.1])
    assert out.loc["ridge", "p_reference_better"] == 1.0
    assert out.loc["ridge", ["n_perturbations", "n_conditions"]].tolist() == [2, 4]
    # whole perturbations are resampled: drug a (3 conditions, +1) and b (1 condition, -1)
    # give only the means of {a, a}, {a, b}, {b, b}; resampling conditions would give others
    boot = _cluster_bootstrap_means(
        np.array([1.0, 1.0, 1.0, -1.0]),
        np.array(["a", "a", "a", "b"]),
        500,
        np.random.default_rng(0),
    )
    assert set(np.round(np.unique(boot), 6)) <= {1.0, 0.5, -1.0}
    assert len(np.unique(boot)) == 3
    # undefined values are not paired; lower-is-better metrics flip the sign
    table = _table(
        {"GIM": [1.0, np.nan, 2.0], "nearest_drug": [3.0, 1.0, 3.0]},
        ["a", "b", "c"],
        metric="energy_distance",
    )
    out = gim_scvi.tl.compare(table, metric="energy_distance").set_index("method")
    assert out.loc["nearest_drug", "n_conditions"] == 2
    assert out.loc["nearest_drug", "difference"] == pytest.approx(1.5)  # GIM is closer
    with pytest.raises(ValueError, match="No method 'chemCPA'"):
        gim_scvi.tl.compare(table, metric="energy_distance", reference="chemCPA")
    with pytest.raises(KeyError, match="no column 'r2_deg'"):
        gim_scvi.tl.compare(table)
