"""The generator ensemble and its second training stage (refit on encoded conditions)."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import gim_scvi
from gim_scvi.model._refit import (
    ContextResiduals,
    context_residuals,
    member_temperatures,
    member_weight_decays,
    refit_generator,
    refit_graph,
    refit_seen_perturbations,
)
from gim_scvi.module import GIMModule, LatentSCM
from gim_scvi.module._module import SEEN_BUFFERS
from tests.conftest import make_small, setup


def _known_contexts(module: GIMModule) -> tuple[ContextResiduals, np.ndarray]:
    """Two drugs at two doses: drug A moves program 0 up, drug B program 2 down."""
    feats = np.array([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0]] * 2, dtype=np.float32)
    dose = np.array([[1000.0], [1000.0], [10000.0], [10000.0]], dtype=np.float32)
    truth = np.array([[2.0, 0, 0], [0, 0, -2.0], [2.0, 0, 0], [0, 0, -2.0]])
    module.feature_mean.zero_()
    module.log_dose_center.fill_(float(np.log(100.0)))
    contexts = ContextResiduals(
        features=feats,
        dose=dose,
        cell_line=np.zeros((4, 1), dtype=np.int64),
        mean=truth,
        second_moment=truth**2 + 0.01,
        n_cells=np.full(4, 50.0),
        basal_mean=np.zeros((1, 3)),
        exogenous_sd=np.ones(3),
    )
    return contexts, truth


def test_refit_recovers_known_shifts_and_sparse_targets():
    torch.manual_seed(0)
    module = GIMModule(n_input=20, n_features=5, n_programs=3, n_generators=3)
    module.temperature = 0.2
    contexts, truth = _known_contexts(module)
    assert module.active_generator is module.joint_generator
    losses = refit_generator(module, contexts, n_steps=400, lr=1e-2, weight_decay=0.0)
    assert len(losses) == 6  # three linear members and three MLPs, all acting
    assert module.active_generator is module.generator
    module.eval()
    out = module.intervention(
        torch.tensor(contexts.features),
        torch.tensor(contexts.dose),
        torch.zeros(4, 1, dtype=torch.long),
        mode="mean",
    )
    np.testing.assert_allclose(out["shift"].detach().numpy(), truth, atol=0.4)
    probs = out["target_probs"].detach().numpy()
    assert (probs[truth != 0] > 0.5).all() and (probs[truth == 0] < 0.5).all()


def test_refit_is_reproducible_and_changes_only_the_generator():
    module = GIMModule(n_input=20, n_features=5, n_programs=3, n_generators=2)
    module.temperature = 0.2
    contexts, _ = _known_contexts(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    first = refit_generator(module, contexts, n_steps=20, seed=4)
    after_first = {k: v.clone() for k, v in module.state_dict().items()}
    assert refit_generator(module, contexts, n_steps=20, seed=4) == first
    for key, value in module.state_dict().items():
        assert torch.equal(value, after_first[key])  # same seed, same members
        if not key.startswith("generator.") and key != "ensemble_fitted":
            assert torch.equal(value, before[key])
    # members start from different points, so they differ
    a, b = module.generator.members[:2]  # two linear members
    assert not torch.equal(a.heads.weight, b.heads.weight)


def test_sample_mode_draws_one_member_per_row():
    torch.manual_seed(0)
    module = GIMModule(n_input=20, n_features=5, n_programs=3, n_generators=2, ensemble_layers=0)
    with torch.no_grad():
        for i, member in enumerate(module.generator.members):
            member.heads.bias.zero_()
            member.heads.weight.zero_()
            member.heads.bias[:3].fill_(20.0)  # every target on
            member.heads.bias[3:6].fill_(1.0 + 2.0 * i)  # member shifts 1 and 3
            member.heads.bias[6:9].fill_(-20.0)  # dose response saturated
    module.ensemble_fitted.fill_(True)
    module.eval()
    feats = torch.ones(400, 5)
    args = (feats, torch.full((400, 1), 100.0), torch.zeros(400, 1, dtype=torch.long))
    sample = module.intervention(*args, mode="sample", generator=torch.Generator().manual_seed(0))
    values = torch.unique(sample["shift"].round(decimals=3))
    assert set(values.tolist()) == {1.0, 3.0}
    mean = module.intervention(*args, mode="mean")
    assert torch.allclose(mean["shift"], torch.full_like(mean["shift"], 2.0), atol=1e-3)


def test_context_residuals_match_encoded_training_cells():
    scvi.settings.seed = 0
    adata = setup(make_small())
    model = gim_scvi.GIM(adata, n_programs=3)
    model.train(
        max_epochs=1,
        split_key="split",
        batch_size=64,
        enable_progress_bar=False,
        generator_refit_steps=0,
    )
    train = np.flatnonzero(adata.obs["split"].to_numpy() == "train")
    contexts = context_residuals(model, train)
    obs = adata.obs.iloc[train]
    treated = ~obs["control"].to_numpy()
    groups = obs[treated].groupby(["condition", "dose", "cell_line"], observed=True)
    assert len(contexts.n_cells) == groups.ngroups
    assert contexts.n_cells.sum() == treated.sum()
    # one context by hand: mean of z A - mu_line over its cells
    (_drug, dose, line), frame = next(iter(groups))
    cells = np.flatnonzero(adata.obs_names.isin(frame.index))
    z = model.get_latent_representation(indices=cells)
    system = model.module.scm.system_matrix().detach().cpu().numpy()
    line_code = model.cell_lines.index(line)
    controls = np.flatnonzero(
        adata.obs["control"].to_numpy() & (adata.obs["cell_line"] == line).to_numpy()
    )
    basal = (model.get_latent_representation(indices=controls) @ system).mean(0)
    np.testing.assert_allclose(contexts.basal_mean[line_code], basal, rtol=1e-4, atol=1e-4)
    expected = (z @ system - basal).mean(0)
    feats = adata.obsm["drug_features"][cells[0]]
    row = np.flatnonzero(
        (contexts.features == feats).all(1)
        & (contexts.dose[:, 0] == dose)
        & (contexts.cell_line[:, 0] == line_code)
    )
    assert len(row) == 1
    np.testing.assert_allclose(contexts.mean[row[0]], expected, rtol=1e-4, atol=1e-4)
    assert (contexts.second_moment >= contexts.mean**2 - 1e-9).all()


def test_train_refits_generator_and_checks_kwargs(tmp_path):
    scvi.settings.seed = 0
    adata = setup(make_small())
    model = gim_scvi.GIM(adata, n_programs=3, n_generators=2)
    kwargs = dict(max_epochs=1, split_key="split", batch_size=64, enable_progress_bar=False)
    with pytest.raises(TypeError, match="generator_refit_kwargs"):
        model.train(**kwargs, generator_refit_kwargs={"steps": 3})
    model.train(**kwargs, generator_refit_steps=30)
    assert len(model.train_params_["generator_refit_loss"]) == 4  # two of each kind
    assert model.train_params_["generator_refit_steps"] == 30
    assert not model.module.training
    assert model.module.active_generator is model.module.generator
    targets = model.get_intervention_targets()
    assert isinstance(targets, pd.DataFrame)
    assert ((targets.to_numpy() >= 0) & (targets.to_numpy() <= 1)).all()

    # the same refit on the saved and loaded model gives the same members: it does not
    # depend on the relaxation temperature the joint training ended at (not saved)
    fitted = {k: v.clone() for k, v in model.module.generator.state_dict().items()}
    model.save(tmp_path / "model")
    loaded = gim_scvi.GIM.load(tmp_path / "model", adata=adata)
    assert loaded.module.temperature != model.module.temperature
    train = np.flatnonzero(adata.obs["split"].to_numpy() == "train")
    refit_generator(loaded.module, context_residuals(loaded, train), n_steps=30, seed=0)
    for key, value in loaded.module.generator.state_dict().items():
        torch.testing.assert_close(value, fitted[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        refit_generator(loaded.module, context_residuals(loaded, train), temperature=0.0)


def test_member_weight_decays():
    assert np.allclose(member_weight_decays(0.03, 3), [0.03, 0.03, 0.03])
    assert np.allclose(member_weight_decays((0.01, 0.1), 3), [0.01, np.sqrt(1e-3), 0.1])
    assert np.allclose(member_weight_decays((0.01, 0.1), 1), [np.sqrt(1e-3)])
    with pytest.raises(ValueError, match="number or"):
        member_weight_decays((0.01, 0.1, 1.0), 3)
    with pytest.raises(ValueError, match="negative"):
        member_weight_decays(-1.0, 2)
    with pytest.raises(ValueError, match="0 < low <= high"):
        member_weight_decays((0.0, 0.1), 2)


def test_member_temperatures():
    assert np.allclose(member_temperatures(0.5, 2), [0.5, 0.5])
    assert np.allclose(member_temperatures((0.2, 1.0), 3), [0.2, np.sqrt(0.2), 1.0])
    with pytest.raises(ValueError, match="positive"):
        member_temperatures(0.0, 2)
    with pytest.raises(ValueError, match="temperature must be a number"):
        member_temperatures((0.2, 0.5, 1.0), 3)


def test_stronger_penalty_shrinks_the_shift():
    module = GIMModule(n_input=10, n_features=5, n_programs=3, n_generators=3)
    contexts, _ = _known_contexts(module)
    refit_generator(module, contexts, n_steps=300, lr=1e-2, weight_decay=(1e-4, 3.0))
    features = torch.as_tensor(contexts.features)
    dose = torch.as_tensor(contexts.dose)
    with torch.no_grad():
        params = module.generator(
            module.standardise_features(features), torch.zeros(4, 1, dtype=torch.long)
        )
        response = module.generator.dose_response(params, module.standardise_log_dose(dose))
        shift = torch.sigmoid(params.target_logits) * response * params.shift
    size = shift.abs().sum(dim=(1, 2))  # per member, from the weakest penalty to the strongest
    assert size[2] < 0.5 * size[0]


def test_seen_perturbations_get_their_own_fitted_intervention(tmp_path):
    scvi.settings.seed = 0
    adata = setup(make_small())
    model = gim_scvi.GIM(adata, n_programs=3, n_generators=2)
    model.train(
        max_epochs=1,
        split_key="split",
        batch_size=64,
        enable_progress_bar=False,
        generator_refit_steps=30,
    )
    model.to_device("cpu")  # trained on a GPU where there is one; the checks build CPU tensors
    module = model.module
    split = adata.obs["split"].astype(str).to_numpy()
    control = adata.obs["control"].to_numpy()
    train_rows = np.unique(adata.obsm["drug_features"][(split == "train") & ~control], axis=0)
    assert torch.equal(module.seen_features, torch.as_tensor(train_rows))
    # every training drug was seen in both lines: all its (drug, line) pairs are fitted
    assert module.seen_fitted.shape == (len(train_rows), 2) and module.seen_fitted.all()
    assert "seen_refit_loss" in model.train_params_
    seen = adata.obsm["drug_features"][(split == "train") & ~control][:1]
    unseen = adata.obsm["drug_features"][split == "test"][:1]
    features = torch.as_tensor(np.vstack([seen, unseen, 0.5 * seen]))
    dose = torch.full((3, 1), 1000.0)
    line = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        out = module.intervention(features, dose, line, mode="mean")
        args = (features, dose, line, "mean", None)
        joint = module._generated_intervention(module.joint_generator, *args)
        own = module._generated_intervention(
            module.joint_generator, *args, module.seen_index(features)
        )
        ensemble = module._generated_intervention(module.generator, *args)
    assert module.seen_index(features)[1:].tolist() == [-1, -1]
    assert module.seen_rows(features).tolist() == [True, False, False]
    # targets, sizes and dose response: the drug's own fit
    logits = module.seen_target_logits[module.seen_index(features[:1]), 0]
    assert module.seen_targets_fitted.all()
    torch.testing.assert_close(out["target_probs"][:1], torch.sigmoid(logits))
    assert torch.allclose(out["shift"][0], own["shift"][0])
    assert not torch.allclose(out["shift"][0], joint["shift"][0])
    for key in ("shift", "target_probs", "target_kl"):
        assert torch.allclose(out[key][1:], ensemble[key][1:])
    # a cell line where the drug has no fit (never seen there) keeps the joint generator
    in_line_1 = (features[:1], dose[:1], torch.ones(1, 1, dtype=torch.long))
    with torch.no_grad():
        fitted = module.intervention(*in_line_1, mode="mean")["shift"]
        module.seen_fitted[module.seen_index(features[:1]), 1] = False
        unfitted = module.intervention(*in_line_1, mode="mean")["shift"]
        joint_1 = module._generated_intervention(module.joint_generator, *in_line_1, "mean", None)
        module.seen_fitted[module.seen_index(features[:1]), 1] = True
    assert torch.allclose(unfitted, joint_1["shift"]) and not torch.allclose(fitted, unfitted)
    model.save(tmp_path / "m")
    loaded = gim_scvi.GIM.load(tmp_path / "m", adata=adata)
    for name in SEEN_BUFFERS:
        assert torch.equal(getattr(loaded.module, name).cpu(), getattr(module, name))

    def fresh_with(state):
        fresh = GIMModule(
            n_input=adata.n_vars, n_features=8, n_programs=3, n_cell_lines=2, n_generators=2
        )
        fresh.load_state_dict(state)
        return fresh.eval()

    # a state saved before the training perturbations were kept loads with none seen
    new_keys = SEEN_BUFFERS
    fresh = fresh_with({k: v for k, v in module.state_dict().items() if k not in new_keys})
    assert fresh.seen_features.shape == (0, 8) and fresh.seen_fitted.shape == (0, 2)
    # one saved before the per-perturbation fits: seen, none fitted (the generator acts)
    fresh = fresh_with({k: v for k, v in module.state_dict().items() if k not in new_keys[1:]})
    assert fresh.seen_fitted.shape == (len(train_rows), 2) and not fresh.seen_fitted.any()
    with torch.no_grad():
        again = fresh.intervention(features, dose, line, mode="mean")
    assert torch.allclose(again["shift"][0], joint["shift"][0])
    # one saved before the targets were fitted too: its own sizes, the generator's targets
    target_keys = ("seen_target_logits", "seen_targets_fitted")
    fresh = fresh_with({k: v for k, v in module.state_dict().items() if k not in target_keys})
    assert fresh.seen_fitted.all() and not fresh.seen_targets_fitted.any()
    with torch.no_grad():
        again = fresh.intervention(features, dose, line, mode="mean")
    assert torch.allclose(again["target_probs"][0], joint["target_probs"][0])
    sizes = again["shift"][0] / again["target_probs"][0]  # t * m * r: m * r is the fit's
    torch.testing.assert_close(sizes, own["shift"][0] / own["target_probs"][0])


def test_seen_perturbations_get_their_own_shifts_and_dose_response():
    torch.manual_seed(0)
    module = GIMModule(n_input=20, n_features=5, n_programs=3, n_generators=0)
    contexts, truth = _known_contexts(module)
    module.set_seen_features(torch.as_tensor(np.unique(contexts.features, axis=0)))
    heads = module.joint_generator.members[0].heads
    with torch.no_grad():  # every drug: programs 0 and 2 targeted, no shift, whatever the input
        heads.weight.zero_()
        bias = heads.bias.view(4, 3)
        bias.zero_()
        bias[0] = torch.tensor([6.0, -6.0, 6.0])
    module.eval()
    args = (
        torch.tensor(contexts.features),
        torch.tensor(contexts.dose),
        torch.zeros(4, 1, dtype=torch.long),
    )
    with torch.no_grad():
        before = module.intervention(*args, mode="mean")
    assert before["shift"].abs().max() < 1e-6
    refit_seen_perturbations(module, contexts, n_steps=600, lr=0.05)
    assert module.seen_fitted.all()
    with torch.no_grad():
        after = module.intervention(*args, mode="mean")
    np.testing.assert_allclose(after["shift"].numpy(), truth, atol=0.3)
    # the generator's targets are the prior: the cells agree with them, so they stay
    assert (after["target_probs"][:, [0, 2]] > 0.9).all()
    assert (after["target_probs"][:, 1] < 0.1).all()
    # a context of a perturbation never seen is an error, not silently skipped
    unseen = ContextResiduals(**{**contexts.__dict__, "features": contexts.features + 5.0})
    with pytest.raises(ValueError, match="seen_features"):
        refit_seen_perturbations(module, unseen, n_steps=1)


@pytest.mark.parametrize("effect", [2.0, 0.05])
def test_seen_targets_move_from_the_generators_only_on_clear_evidence(effect):
    torch.manual_seed(0)
    module = GIMModule(n_input=20, n_features=5, n_programs=3, n_generators=0)
    contexts, _ = _known_contexts(module)
    # both drugs move program 1 only (by `effect`); the generator says programs 0 and 2
    truth = np.zeros((4, 3))
    truth[:, 1] = effect
    contexts = dataclasses.replace(contexts, mean=truth, second_moment=truth**2 + 0.01)
    module.set_seen_features(torch.as_tensor(np.unique(contexts.features, axis=0)))
    heads = module.joint_generator.members[0].heads
    with torch.no_grad():
        heads.weight.zero_()
        heads.bias.view(4, 3)[0] = torch.tensor([4.0, -4.0, 4.0])
    refit_seen_perturbations(module, contexts, n_steps=600, lr=0.05)
    module.eval()
    with torch.no_grad():
        probs = module.intervention(
            torch.tensor(contexts.features),
            torch.tensor(contexts.dose),
            torch.zeros(4, 1, dtype=torch.long),
            mode="mean",
        )["target_probs"]
    if effect > 1:  # 50 cells per dose say clearly: program 1 is targeted
        assert (probs[:, 1] > 0.9).all()
    else:  # a change within the noise does not overturn the generator's targets
        assert (probs[:, 1] < 0.1).all() and (probs[:, [0, 2]] > 0.9).all()


def _chain_contexts(rng, n_contexts: int = 120) -> tuple[ContextResiduals, np.ndarray]:
    """Single-program interventions in the DAG 0 -> 1 -> 2, program 3 on its own."""
    true = np.zeros((4, 4))
    true[0, 1], true[1, 2] = 0.8, -0.7
    shifts = np.zeros((n_contexts, 4))
    shifts[np.arange(n_contexts), rng.integers(0, 4, n_contexts)] = rng.choice(
        [-2.0, -1.0, 1.0, 2.0], n_contexts
    )
    delta = shifts @ np.linalg.inv(np.eye(4) - true)  # each context's change of programs
    delta += 0.02 * rng.normal(size=delta.shape)
    contexts = ContextResiduals(
        features=np.zeros((n_contexts, 2), dtype=np.float32),
        dose=None,
        cell_line=np.zeros((n_contexts, 1), dtype=np.int64),
        mean=delta,  # residual = change under an empty graph
        second_moment=delta**2,
        n_cells=np.full(n_contexts, 30.0),
        basal_mean=np.zeros((1, 4)),
        exogenous_sd=np.ones(4),
    )
    return contexts, true


def test_refit_graph_recovers_a_chain_with_its_directions(rng):
    contexts, true = _chain_contexts(rng)
    scm = LatentSCM(4)
    with torch.no_grad():  # start from a wrong graph, pruned to the one edge 3 -> 0
        scm.weight_raw.zero_()
        scm.weight_raw[3, 0] = 0.5
        scm.edge_mask.zero_()
        scm.edge_mask[3, 0] = 1.0
    start = np.eye(4) - scm.weight.detach().numpy()  # residuals under it: change @ A
    contexts = ContextResiduals(**{**contexts.__dict__, "mean": contexts.mean @ start})
    out = refit_graph(SimpleNamespace(scm=scm), contexts, threshold=0.1)
    learned = scm.weight.detach().numpy()
    assert out == {"edges": 2, "removed_small": 10, "removed_on_cycles": 0}
    assert scm.is_acyclic()
    np.testing.assert_allclose(learned, true, atol=0.1)  # both edges, the right way round


def test_refit_graph_rejects_a_cyclic_model(rng):
    contexts, _ = _chain_contexts(rng)
    with pytest.raises(ValueError, match="DAG"):
        refit_graph(SimpleNamespace(scm=LatentSCM(4, graph="cyclic")), contexts)


def test_train_refits_the_graph_unless_asked_not_to():
    adata = setup(make_small())
    kwargs = dict(max_epochs=2, split_key="split", batch_size=64, enable_progress_bar=False)
    graphs = {}
    for refit in (True, False):
        scvi.settings.seed = 0
        model = gim_scvi.GIM(adata, n_programs=4, n_generators=2)
        model.train(**kwargs, graph_refit=refit)
        graphs[refit] = model.get_causal_graph().to_numpy()
        assert model.module.scm.is_acyclic()
        assert model.train_params_["graph_refit"] is refit
        if refit:
            assert model.train_params_["graph_refit_edges"] == (graphs[True] != 0).sum()
    assert model.train_params_.get("graph_refit_edges") is None
    assert not np.allclose(graphs[True], graphs[False])
    with pytest.raises(TypeError, match="graph_refit_kwargs"):
        model.train(**kwargs, graph_refit_kwargs={"threshold": 0.1})


def test_each_kind_of_member_spreads_its_own_penalties():
    from gim_scvi.model._refit import _ladders_by_kind

    module = GIMModule(n_input=20, n_features=5, n_programs=3, n_generators=3)
    decays, temperatures = _ladders_by_kind(module.generator, (0.01, 0.1), (0.2, 1.0))
    np.testing.assert_allclose(decays, np.tile(np.geomspace(0.01, 0.1, 3), 2))
    np.testing.assert_allclose(temperatures, np.tile(np.geomspace(0.2, 1.0, 3), 2))
