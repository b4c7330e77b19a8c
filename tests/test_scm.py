import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gim_scvi.data import random_dag
from gim_scvi.module import LatentSCM


def _scm_with(weight: np.ndarray, graph: str = "dag") -> LatentSCM:
    scm = LatentSCM(weight.shape[0], graph=graph)
    with torch.no_grad():
        scm.weight_raw.copy_(torch.as_tensor(weight, dtype=torch.float32))
    return scm


def test_solve_matches_structural_equations(rng):
    w = random_dag(6, 0.5, rng)
    scm = _scm_with(w)
    u = torch.randn(10, 6)
    a = torch.randn(10, 6)
    z = scm.solve(u, a)
    # z = z W + u + a holds exactly
    assert torch.allclose(z, z @ torch.as_tensor(w, dtype=torch.float32) + u + a, atol=1e-5)
    # abduction recovers u; prediction with a = 0 after abduction returns the input
    assert torch.allclose(scm.abduct(z, a), u, atol=1e-5)
    z0 = scm.solve(u)
    assert torch.allclose(scm.solve(scm.abduct(z0)), z0, atol=1e-5)
    assert abs(float(scm.log_abs_det())) < 1e-5
    assert float(scm.acyclicity()) < 1e-5


def test_acyclicity_penalty_positive_on_cycle():
    w = np.zeros((3, 3))
    w[0, 1] = w[1, 2] = w[2, 0] = 0.8
    scm = _scm_with(w)
    assert float(scm.acyclicity()) > 1e-3
    assert not scm.is_acyclic()
    info = scm.make_acyclic()
    assert scm.is_acyclic()
    assert info["removed_on_cycles"] == 1
    # the weakest edge goes: make one edge weaker and check it is the one removed
    w[1, 2] = 0.3
    scm = _scm_with(w)
    scm.make_acyclic()
    assert float(scm.weight[1, 2]) == 0.0 and float(scm.weight[0, 1]) != 0.0


def test_broken_cycles_are_reported_unless_silenced(caplog):
    w = np.zeros((3, 3))
    w[0, 1] = w[1, 2] = w[2, 0] = 0.8
    with caplog.at_level("WARNING", logger="gim_scvi.module._scm"):
        _scm_with(w).make_acyclic(warn=False)
        assert not caplog.records
        _scm_with(w).make_acyclic()
    assert "cycles" in caplog.text


def test_cyclic_and_none_parameterisations():
    w = np.full((4, 4), 2.0)
    scm = _scm_with(w, graph="cyclic")
    assert float(torch.linalg.matrix_norm(scm.weight, ord=2)) <= 0.9 + 1e-4
    assert torch.all(torch.diagonal(scm.weight) == 0)
    none = _scm_with(w, graph="none")
    assert torch.all(none.weight == 0)
    with pytest.raises(ValueError, match="graph must be"):
        LatentSCM(3, graph="tree")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=8),
    edge_prob=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_solver_property(n, edge_prob, seed):
    rng = np.random.default_rng(seed)
    w = random_dag(n, edge_prob, rng)
    scm = _scm_with(w)
    u = torch.as_tensor(rng.normal(size=(5, n)), dtype=torch.float32)
    a = torch.as_tensor(rng.normal(size=(5, n)), dtype=torch.float32)
    z = scm.solve(u, a)
    expected = (u + a).numpy() @ np.linalg.inv(np.eye(n) - w)
    assert np.allclose(z.detach().numpy(), expected, atol=1e-4)
    assert torch.allclose(scm.solve(scm.abduct(z)), z, atol=1e-4)
    assert scm.is_acyclic()
