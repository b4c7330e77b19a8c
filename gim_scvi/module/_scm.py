"""Latent structural causal model over gene programs.

The programs ``z`` follow the linear structural equations ``z = z W + u + a`` (rows are cells,
``W[i, j]`` is the weight of the edge ``i -> j``), so that ``z = (u + a) (I - W)^{-1}``.
"""

from __future__ import annotations

import logging
from typing import Literal

import networkx as nx
import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

GraphType = Literal["dag", "cyclic", "none"]


class LatentSCM(nn.Module):
    """Linear SCM over ``n_programs`` latent gene programs.

    Parameters
    ----------
    n_programs
        Number of latent programs ``K``.
    graph
        ``"dag"``: ``W`` is pushed towards acyclicity by the NOTEARS penalty
        ``tr(exp(W * W)) - K`` during training and projected onto an exact DAG by
        :meth:`make_acyclic` afterwards. ``"cyclic"``: ``W`` is free but rescaled to spectral
        norm below ``max_spectral_norm`` (so that the equilibrium exists). ``"none"``: ``W = 0``.
    max_spectral_norm
        Bound on the spectral norm of ``W`` for ``graph="cyclic"``.
    init_scale
        Standard deviation of the initial edge weights.
    """

    def __init__(
        self,
        n_programs: int,
        graph: GraphType = "dag",
        max_spectral_norm: float = 0.9,
        init_scale: float = 0.01,
    ):
        super().__init__()
        if graph not in ("dag", "cyclic", "none"):
            raise ValueError(f"graph must be 'dag', 'cyclic' or 'none', got {graph!r}.")
        self.n_programs = n_programs
        self.graph = graph
        self.max_spectral_norm = max_spectral_norm
        self.weight_raw = nn.Parameter(init_scale * torch.randn(n_programs, n_programs))
        # 1 where an edge may exist; the diagonal is always excluded, pruning removes more.
        self.register_buffer("edge_mask", 1.0 - torch.eye(n_programs))

    @property
    def weight(self) -> torch.Tensor:
        """The weighted adjacency ``W`` (``K x K``)."""
        if self.graph == "none":
            return torch.zeros_like(self.weight_raw)
        w = self.weight_raw * self.edge_mask
        if self.graph == "cyclic":
            norm = torch.linalg.matrix_norm(w, ord=2)
            w = w * torch.clamp(self.max_spectral_norm / (norm + 1e-8), max=1.0)
        return w

    def system_matrix(self) -> torch.Tensor:
        """``A = I - W`` in row convention (``u + a = z A``)."""
        eye = torch.eye(self.n_programs, device=self.weight_raw.device)
        return eye - self.weight

    def solve_matrix(self) -> torch.Tensor:
        """``A^{-1} = (I - W)^{-1}``, computed once per call (``K x K``)."""
        return torch.linalg.inv(self.system_matrix())

    def log_abs_det(self) -> torch.Tensor:
        """``log |det (I - W)|``; zero for an exact DAG."""
        if self.graph == "none":
            return torch.zeros((), device=self.weight_raw.device)
        return torch.linalg.slogdet(self.system_matrix())[1]

    def solve(self, exogenous: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Programs from exogenous state and interventions: ``z = (u + a) A^{-1}``."""
        rhs = exogenous if shift is None else exogenous + shift
        return rhs @ self.solve_matrix()

    def abduct(self, z: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Exogenous residual that explains ``z``: ``u = z A - a``."""
        u = z @ self.system_matrix()
        return u if shift is None else u - shift

    def total_effects(self, shift: torch.Tensor) -> torch.Tensor:
        """Change of the programs caused by a shift: ``a A^{-1}``."""
        return shift @ self.solve_matrix()

    def acyclicity(self) -> torch.Tensor:
        """NOTEARS acyclicity ``h(W) = tr(exp(W * W)) - K``; zero iff ``W`` is a DAG."""
        if self.graph != "dag":
            return torch.zeros((), device=self.weight_raw.device)
        w = self.weight
        return torch.trace(torch.linalg.matrix_exp(w * w)) - self.n_programs

    def l1(self) -> torch.Tensor:
        """L1 norm of the edge weights."""
        return self.weight.abs().sum()

    @torch.no_grad()
    def make_acyclic(self, threshold: float = 0.0, warn: bool = True) -> dict[str, int]:
        """Project ``W`` onto an exact DAG by pruning edges.

        Edges with ``|w| <= threshold`` are removed; then, while a cycle remains, its weakest
        edge is removed. The pruning is stored in ``edge_mask`` so that it survives saving.

        Parameters
        ----------
        threshold
            Absolute weight at or below which an edge is dropped.
        warn
            Log a warning (with advice for the joint training) when cycles had to be broken.

        Returns
        -------
        Counts of edges ``"removed_small"`` and ``"removed_on_cycles"``.
        """
        if self.graph != "dag":
            return {"removed_small": 0, "removed_on_cycles": 0}
        w = (self.weight_raw * self.edge_mask).cpu().numpy()
        small = (np.abs(w) <= threshold) & (self.edge_mask.cpu().numpy() > 0)
        w[small] = 0.0
        digraph = nx.DiGraph()
        digraph.add_nodes_from(range(self.n_programs))
        rows, cols = np.nonzero(w)
        digraph.add_weighted_edges_from(
            (int(i), int(j), abs(float(w[i, j]))) for i, j in zip(rows, cols, strict=True)
        )
        n_cycle = 0
        while True:
            try:
                cycle = nx.find_cycle(digraph)
            except nx.NetworkXNoCycle:
                break
            i, j = min(cycle, key=lambda e: digraph.edges[e[0], e[1]]["weight"])[:2]
            digraph.remove_edge(i, j)
            w[i, j] = 0.0
            n_cycle += 1
        mask = torch.as_tensor(w != 0.0, dtype=self.edge_mask.dtype, device=self.edge_mask.device)
        self.edge_mask.copy_(mask)
        if n_cycle and warn:
            logger.warning(
                "The learned graph still had cycles after training; removed the weakest edge of "
                "each remaining cycle (%d edges). Train for more epochs, or raise the final "
                "acyclicity weight: `train(plan_kwargs={'dag_weight_max': 1e4})` (default 1e3).",
                n_cycle,
            )
        return {"removed_small": int(small.sum()), "removed_on_cycles": n_cycle}

    def is_acyclic(self) -> bool:
        """Whether the current graph is exactly acyclic."""
        w = self.weight.detach().cpu().numpy()
        return nx.is_directed_acyclic_graph(nx.DiGraph((w != 0).astype(int)))
