import pytest
import torch

from gim_scvi._constants import GIM_REGISTRY_KEYS as KEYS
from gim_scvi.module import GIMModule, ProgramDecoder


def _batch(n=12, p=5, g=20):
    feats = torch.zeros(n, p)
    feats[4:8] = torch.tensor([1.0, 0, 2, 0, 1])  # context A
    feats[8:] = torch.tensor([0.0, 3, 0, 1, 0])  # context B
    return {
        KEYS.X_KEY: torch.poisson(torch.full((n, g), 3.0)),
        KEYS.FEATURES_KEY: feats,
        KEYS.DOSE_KEY: torch.cat([torch.zeros(4, 1), torch.full((8, 1), 100.0)]),
        KEYS.CONTROL_KEY: torch.cat([torch.ones(4, 1), torch.zeros(8, 1)]),
        KEYS.CELL_LINE_KEY: torch.zeros(n, 1),
    }


def test_shapes_and_loss_terms():
    module = GIMModule(n_input=20, n_features=5, n_programs=3)
    module.train()
    tensors = _batch()
    inf, gen, loss = module(tensors)
    assert inf["z"].shape == (12, 3)
    assert gen["shift"].shape == (12, 3)
    # controls get no intervention and no target KL
    assert torch.all(gen["shift"][:4] == 0)
    assert torch.all(gen["target_kl"][:4] == 0)
    assert torch.all(gen["target_kl"][4:] > 0)
    # one intervention sample per context: cells of one context share it
    assert torch.allclose(gen["shift"][4:8], gen["shift"][4:5].expand(4, -1))
    assert torch.allclose(gen["shift"][8:], gen["shift"][8:9].expand(4, -1))
    assert set(loss.kl_local) == {"kl_z", "kl_targets"}
    assert torch.isfinite(loss.loss)
    assert loss.reconstruction_loss["reconstruction_loss"].shape == (12,)
    loss.loss.backward()
    assert module.joint_generator.members[0].heads.weight.grad is not None
    assert module.scm.weight_raw.grad is not None


def test_dag_weight_enters_loss():
    module = GIMModule(n_input=20, n_features=5, n_programs=3)
    with torch.no_grad():
        module.scm.weight_raw.fill_(0.3)
    module.eval()
    tensors = _batch()
    torch.manual_seed(0)
    _, _, low = module(tensors, loss_kwargs={"dag_weight": 0.0})
    torch.manual_seed(0)
    _, _, high = module(tensors, loss_kwargs={"dag_weight": 10.0})
    h = float(module.scm.acyclicity())
    assert h > 0
    assert abs(float(high.loss - low.loss) - 10.0 * h) < 1e-2 * max(1.0, 10 * h)


def test_relu_loadings_reach_zero_and_softplus_ones_do_not():
    relu = ProgramDecoder(3, 20, loadings_activation="relu")
    soft = ProgramDecoder(3, 20, loadings_activation="softplus")
    # both start from the same distribution of positive loadings (about softplus(-1))
    assert torch.all(relu.loadings > 0)
    assert abs(float(relu.loadings.mean() - soft.loadings.mean())) < 0.05
    with torch.no_grad():
        relu.loadings_raw[0] = -0.5
        soft.loadings_raw[0] = -0.5
    assert torch.all(relu.loadings[0] == 0)
    assert torch.all(soft.loadings[0] > 0)
    assert torch.all(relu.loadings >= 0)
    with pytest.raises(ValueError, match="loadings_activation"):
        ProgramDecoder(3, 20, loadings_activation="exp")


def test_loadings_activation_survives_save_and_old_states_load_as_softplus():
    module = GIMModule(n_input=20, n_features=5, n_programs=3, loadings_activation="softplus")
    state = module.state_dict()
    fresh = GIMModule(n_input=20, n_features=5, n_programs=3)  # default: relu
    assert fresh.decoder.loadings_activation == "relu"
    fresh.load_state_dict(state)
    assert fresh.decoder.loadings_activation == "softplus"
    assert torch.equal(fresh.decoder.loadings, module.decoder.loadings)
    # a state saved before the parameterisation was stored: softplus, as it was then
    del state["decoder.relu_loadings"]
    fresh = GIMModule(n_input=20, n_features=5, n_programs=3)
    fresh.load_state_dict(state)
    assert fresh.decoder.loadings_activation == "softplus"
    assert torch.equal(fresh.decoder.loadings, module.decoder.loadings)
    relu = GIMModule(n_input=20, n_features=5, n_programs=3)
    fresh = GIMModule(n_input=20, n_features=5, n_programs=3, loadings_activation="softplus")
    fresh.load_state_dict(relu.state_dict())
    assert fresh.decoder.loadings_activation == "relu"


def test_program_overlap_enters_loss():
    module = GIMModule(n_input=20, n_features=5, n_programs=3, program_overlap_weight=0.0)
    module.eval()
    tensors = _batch()
    torch.manual_seed(0)
    _, _, without = module(tensors)
    module.program_overlap_weight = 7.0
    torch.manual_seed(0)
    _, _, with_ = module(tensors)
    overlap = float(module.decoder.program_overlap())
    assert 0 < overlap < 1  # the starting loadings are positive everywhere: they overlap
    assert abs(float(with_.loss - without.loss) - 7.0 * overlap) < 1e-3  # float32 of ~4e3
    assert abs(float(with_.extra_metrics["program_overlap"]) - overlap) < 1e-6
    # programs on disjoint genes do not overlap; copies of one program overlap fully
    with torch.no_grad():
        module.decoder.loadings_raw.zero_()
        for k in range(3):
            module.decoder.loadings_raw[k::3, k] = 1.0
    assert float(module.decoder.program_overlap()) == 0.0
    with torch.no_grad():
        module.decoder.loadings_raw.fill_(1.0)
    assert abs(float(module.decoder.program_overlap()) - 1.0) < 1e-6


def test_l1_prior_zeroes_relu_loadings_but_only_shrinks_softplus_ones():
    for activation in ("relu", "softplus"):
        torch.manual_seed(0)
        decoder = ProgramDecoder(3, 20, loadings_activation=activation)
        optimizer = torch.optim.Adam([decoder.loadings_raw], lr=0.05)
        for _ in range(100):
            optimizer.zero_grad()
            decoder.loadings.abs().sum().backward()
            optimizer.step()
        if activation == "relu":
            assert torch.all(decoder.loadings == 0)
        else:
            assert torch.all(decoder.loadings > 0)
            assert float(decoder.loadings.max()) < 0.05


def test_ensemble_kinds_can_be_switched_off():
    from gim_scvi.module import GeneratorEnsemble

    ensemble = GeneratorEnsemble(2, n_layers=(0, 1), n_features=4, n_programs=3, n_cell_lines=2)
    assert ensemble.member_layers == [0, 0, 1, 1] and len(ensemble) == 4
    assert ensemble.members[0].mlp is None and ensemble.members[2].mlp is not None
    features, lines = torch.randn(5, 4), torch.zeros(5, 1, dtype=torch.long)
    assert ensemble(features, lines).shift.shape == (4, 5, 3)
    ensemble.set_active_kinds((1,))
    assert ensemble.active_kinds == (1,) and ensemble.active.tolist() == [0, 0, 1, 1]
    mlp_only = ensemble(features, lines).shift
    assert mlp_only.shape == (2, 5, 3)
    torch.testing.assert_close(mlp_only[0], ensemble.members[2](features, lines).shift)
    with pytest.raises(ValueError, match="cannot activate"):
        ensemble.set_active_kinds((2,))
    with pytest.raises(ValueError, match="distinct"):
        GeneratorEnsemble(2, n_layers=(1, 1), n_features=4, n_programs=3)
    ensemble.set_active_kinds(None)
    assert ensemble.active.all()


def test_models_saved_with_all_columns_and_linear_members_load():
    """Saved weights say how the generators were built (older models: every column, linear)."""
    old = GIMModule(n_input=20, n_features=5, n_programs=3, feature_components=None)
    old.generator = type(old.generator)(3, n_layers=0, n_features=5, n_programs=3, n_bottleneck=16)
    state = {k: v for k, v in old.state_dict().items() if not k.endswith(".active")}
    new = GIMModule(n_input=20, n_features=5, n_programs=3, feature_components=4)
    assert new.feature_projection.shape == (5, 4) and new.generator.kinds == (0, 1)
    new.load_state_dict(state)
    assert new.feature_projection is None and new.generator.member_layers == [0, 0, 0]
    assert new.generator.active.all()
    features = torch.randn(6, 5)
    lines = torch.zeros(6, 1, dtype=torch.long)
    old.eval(), new.eval()
    for net in ("joint_generator", "generator"):
        want = getattr(old, net)(old.standardise_features(features), lines).shift
        got = getattr(new, net)(new.standardise_features(features), lines).shift
        torch.testing.assert_close(got, want)
    back = GIMModule(n_input=20, n_features=5, n_programs=3, feature_components=None)
    back.load_state_dict(GIMModule(n_input=20, n_features=5, n_programs=3).state_dict())
    assert back.feature_projection.shape == (5, 5) and back.generator.kinds == (0, 1)
