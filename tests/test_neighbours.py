import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from conftest import make_small, setup

import gim_scvi
from gim_scvi.module import GIMModule
from gim_scvi.module._neighbours import feature_similarity, neighbour_weights


def test_feature_similarity_is_tanimoto_for_bits_and_scaled_distance_otherwise():
    seen = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    query = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    sim = feature_similarity(query, seen)
    torch.testing.assert_close(sim, torch.tensor([[2 / 3, 1 / 4], [0.0, 0.0]]))
    dense = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    sim = feature_similarity(torch.tensor([[0.0, 0.0]]), dense)
    # minus the distance in units of the median one (5): equal row 0, the farthest -2
    torch.testing.assert_close(sim, torch.tensor([[0.0, -1.0, -2.0]]))
    scaled = feature_similarity(torch.tensor([[0.0, 0.0]]), dense, torch.tensor([1.0, 100.0]))
    assert scaled[0, 0] == 0 and scaled[0, 1] == -1.0  # the same ranks with other scales


def test_neighbour_weights_respect_the_mask_and_the_temperature():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.4]])
    allowed = torch.tensor([[True, True, True], [False, False, False]])
    sharp = neighbour_weights(sim, 0.001, allowed)
    torch.testing.assert_close(sharp, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    flat = neighbour_weights(sim, 100.0, torch.tensor([False, True, True]))
    torch.testing.assert_close(flat[:, 0], torch.zeros(2))
    torch.testing.assert_close(flat.sum(1), torch.ones(2))
    assert (flat[:, 1:] - 0.5).abs().max() < 0.01


def _module_with_two_seen_drugs() -> GIMModule:
    """Seen A (bits 0, 1) shifts program 0 by +2, seen B (bits 2, 3) program 2 by -2."""
    module = GIMModule(
        n_input=10, n_features=4, n_programs=3, n_generators=1, ensemble_layers=0, has_dose=False
    )
    module.set_seen_features(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
    with torch.no_grad():
        for net in (module.joint_generator, module.generator):
            heads = net.members[0].heads
            heads.weight.zero_()
            heads.bias.zero_()
        # every program targeted by the joint generator, no shift from either generator
        module.joint_generator.members[0].heads.bias.view(4, 3)[0] = 8.0
        module.seen_params[0, 0, 0] = torch.tensor([2.0, 0.0, 0.0])
        module.seen_params[1, 0, 0] = torch.tensor([0.0, 0.0, -2.0])
        module.seen_params[:, :, 2] = 1.0  # slope (no dose: the response is 1 anyway)
        module.seen_fitted.fill_(True)
        module.ensemble_fitted.fill_(True)
    return module.eval()


def test_unseen_drug_borrows_from_its_most_similar_seen_drug():
    module = _module_with_two_seen_drugs()
    unseen = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # Tanimoto 2/3 to A, 1/4 to B
    line = torch.zeros(1, 1, dtype=torch.long)

    def shift(features=unseen, **kwargs):
        with torch.no_grad():
            return module.intervention(features, None, line, mode="mean", **kwargs)["shift"]

    torch.testing.assert_close(shift(), torch.zeros(1, 3))  # weight 0: the ensemble alone
    module.neighbour_weight.fill_(1.0)
    module.neighbour_temperature.fill_(0.01)
    torch.testing.assert_close(shift(), torch.tensor([[2.0, 0.0, 0.0]]), atol=1e-3, rtol=0)
    module.neighbour_weight.fill_(0.5)
    torch.testing.assert_close(shift(), torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-3, rtol=0)
    module.neighbour_temperature.fill_(100.0)  # flat: both drugs alike
    torch.testing.assert_close(shift(), torch.tensor([[0.5, 0.0, -0.5]]), atol=1e-2, rtol=0)
    # a seen drug keeps its own fit; the feature-only view is the ensemble's alone
    module.neighbour_weight.fill_(1.0)
    module.neighbour_temperature.fill_(0.01)
    seen_a = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(shift(seen_a), torch.tensor([[2.0, 0.0, 0.0]]), atol=1e-3, rtol=0)
    torch.testing.assert_close(shift(unseen, use_seen=False), torch.zeros(1, 3))
    # a seen drug is never its own neighbour
    with torch.no_grad():
        borrowed, has = module.neighbour_intervention(seen_a, None, line, "mean")
    torch.testing.assert_close(
        borrowed["shift"], torch.tensor([[0.0, 0.0, -2.0]]), atol=1e-3, rtol=0
    )
    assert has.tolist() == [True]
    # no fitted neighbour in the line: the ensemble alone
    module.seen_fitted.fill_(False)
    torch.testing.assert_close(shift(), torch.zeros(1, 3))


def test_sampled_interventions_come_from_one_source_per_row():
    module = _module_with_two_seen_drugs()
    module.neighbour_weight.fill_(0.5)
    module.neighbour_temperature.fill_(100.0)
    features = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(400, 1)
    line = torch.zeros(400, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        shift = module.intervention(features, None, line, mode="sample", generator=generator)
    rows = {tuple(np.round(row, 3)) for row in shift["shift"].numpy()}
    # the ensemble's (no shift), A's or B's whole intervention, never a blend
    assert rows <= {(0.0, 0.0, 0.0), (2.0, 0.0, 0.0), (0.0, 0.0, -2.0)}
    share = (shift["shift"].abs().sum(1) > 0).float().mean()
    assert 0.4 < share < 0.6


def test_older_states_load_without_neighbours():
    module = _module_with_two_seen_drugs()
    module.neighbour_weight.fill_(1.0)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("neighbour_")}
    fresh = GIMModule(n_input=10, n_features=4, n_programs=3, n_generators=1, has_dose=False)
    fresh.load_state_dict(state)
    assert float(fresh.neighbour_weight) == 0.0
    fresh.load_state_dict(module.state_dict())
    assert float(fresh.neighbour_weight) == 1.0


def test_train_chooses_the_mixture_on_unseen_validation_drugs(trained, tmp_path):
    model, adata = trained  # trained with validation_split="valid": one whole drug
    table = model.neighbour_selection_
    assert len(table) == 7 and table["chosen"].sum() == 1  # weight 0 + 2 weights x 3 temps
    assert table.loc[0, "weight"] == 0.0 and np.isfinite(table["r2_deg"]).all()
    chosen = table.loc[table["chosen"]].iloc[0]
    best = table["r2_deg"].idxmax()
    assert table.loc[best, "gap"] == 0 and (table["gap"] >= 0).all()
    # the smallest weight within one standard error of the best
    within = table[table["gap"] <= table["gap_se"]]
    assert chosen["weight"] == within["weight"].min() and chosen["gap"] <= chosen["gap_se"]
    assert float(model.module.neighbour_weight) == chosen["weight"]
    assert model.train_params_["neighbour_weight"] == chosen["weight"]
    again = model.select_neighbour_mixture(weights=(0.0, 1.0), temperatures=(0.05,))
    assert len(again) == 2
    model.save(tmp_path / "m")
    loaded = gim_scvi.GIM.load(tmp_path / "m", adata=adata)
    assert float(loaded.module.neighbour_weight) == float(model.module.neighbour_weight)
    with pytest.raises(ValueError, match="unseen in training"):
        model.select_neighbour_mixture(validation_split="train")
    with pytest.raises(ValueError, match="include 0"):
        model.select_neighbour_mixture(weights=(0.5, 1.0))
    with pytest.raises(ValueError, match="positive"):
        model.select_neighbour_mixture(temperatures=(0.0,))
    # train() scored both choices on one set of validation cells: a fresh one agrees
    pd.testing.assert_frame_equal(model.select_neighbour_mixture(), table)


def test_cli_reports_the_choice(capsys):
    from types import SimpleNamespace

    import pandas as pd

    from gim_scvi.cli import _print_neighbour_choice

    table = pd.DataFrame(
        {
            "weight": [0.0, 0.5, 1.0],
            "temperature": [0.005, 0.005, 0.02],
            "r2_deg": [0.30, 0.45, 0.40],
            "n_conditions": [12, 12, 12],
            "chosen": [True, False, False],
        }
    )
    _print_neighbour_choice(SimpleNamespace(neighbour_selection_=table))
    assert "ensemble alone" in capsys.readouterr().out
    table["chosen"] = [False, True, False]
    _print_neighbour_choice(SimpleNamespace(neighbour_selection_=table))
    out = capsys.readouterr().out
    assert "borrow 50%" in out and "temperature 0.005" in out and "0.450" in out
    _print_neighbour_choice(SimpleNamespace(neighbour_selection_=None))
    assert capsys.readouterr().out == ""


def test_neighbour_mixing_in_blocks_gives_the_same_rows(monkeypatch):
    import gim_scvi.module._module as module_code

    module = _module_with_two_seen_drugs()
    module.neighbour_weight.fill_(0.5)
    module.neighbour_temperature.fill_(0.3)
    features = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    features = features.repeat(5, 1)
    line = torch.zeros(len(features), 1, dtype=torch.long)
    with torch.no_grad():
        whole = module.intervention(features, None, line, mode="mean")
        monkeypatch.setattr(module_code, "NEIGHBOUR_BLOCK_VALUES", 12)  # 2 rows per block
        blocks = module.intervention(features, None, line, mode="mean")
    for key in ("shift", "target_probs", "targets", "dose_response"):
        torch.testing.assert_close(blocks[key], whole[key])
    assert not torch.allclose(whole["shift"][0], whole["shift"][1])  # rows differ


def test_train_can_skip_the_choice():
    scvi.settings.seed = 0
    adata = setup(make_small())
    model = gim_scvi.GIM(adata, n_programs=3, n_generators=2)
    model.train(
        max_epochs=1,
        split_key="split",
        validation_split="valid",
        batch_size=64,
        enable_progress_bar=False,
        generator_refit_steps=20,
        neighbour_selection=False,
    )
    assert model.neighbour_selection_ is None and float(model.module.neighbour_weight) == 0.0
    assert model.train_params_["neighbour_selection"] is False
    model.module.ensemble_fitted.fill_(False)  # as with n_generators=0: nothing to mix with
    with pytest.raises(ValueError, match="generator ensemble"):
        model.select_neighbour_mixture()


def test_selection_error_counts_each_perturbation_once():
    from gim_scvi.model._neighbours import _gaps_to_best

    index = pd.MultiIndex.from_product([["d1", "d2", "d3"], ["A", "B", "C"]])
    best = pd.Series(1.0, index=index)
    # the other candidate falls short by 0.1 / 0.3 / 0.2 in every line of a drug
    other = best - np.repeat([0.1, 0.3, 0.2], 3)
    gaps, errors = _gaps_to_best([best, other], np.array([1.0, 0.8]))
    np.testing.assert_allclose(gaps, [0.0, 0.2])
    per_drug = np.array([0.1, 0.3, 0.2])
    np.testing.assert_allclose(errors, [0.0, per_drug.std(ddof=1) / np.sqrt(3)])
    # counting the nine conditions as independent would give a smaller error
    assert errors[1] > np.repeat(per_drug, 3).std(ddof=1) / 3


def test_train_chooses_the_ensemble_members_on_unseen_validation_drugs(trained, tmp_path):
    model, adata = trained
    table = model.ensemble_selection_
    assert table["member_layers"].tolist() == ["0", "1", "0+1"]
    assert table["chosen"].sum() == 1 and np.isfinite(table["r2_deg"]).all()
    chosen = table.loc[table["chosen"]].iloc[0]
    assert chosen["r2_deg"] == table["r2_deg"].max()
    kinds = tuple(int(v) for v in chosen["member_layers"].split("+"))
    assert model.module.generator.active_kinds == kinds
    assert model.train_params_["ensemble_member_layers"] == list(kinds)
    # the choice is made with the neighbour mixture off, and leaves the mixture as it was
    weight = float(model.module.neighbour_weight)
    model.module.generator.set_active_kinds((0,))
    again = model.select_ensemble_members()
    assert float(model.module.neighbour_weight) == weight
    pd.testing.assert_frame_equal(again, table)
    model.save(tmp_path / "m")
    loaded = gim_scvi.GIM.load(tmp_path / "m", adata=adata)
    assert loaded.module.generator.active_kinds == kinds
    with pytest.raises(ValueError, match="unseen in training"):
        model.select_ensemble_members(validation_split="train")


def test_cli_reports_the_member_choice(capsys):
    from types import SimpleNamespace

    from gim_scvi.cli import _print_ensemble_choice

    table = pd.DataFrame(
        {
            "member_layers": ["0", "1", "0+1"],
            "r2_deg": [0.30, 0.45, 0.40],
            "n_conditions": [12, 12, 12],
            "chosen": [False, True, False],
        }
    )
    _print_ensemble_choice(SimpleNamespace(ensemble_selection_=table))
    out = capsys.readouterr().out
    assert "generator ensemble: MLPs" in out and "linear maps 0.300" in out and "all 0.400" in out
    _print_ensemble_choice(SimpleNamespace(ensemble_selection_=None))
    assert capsys.readouterr().out == ""
