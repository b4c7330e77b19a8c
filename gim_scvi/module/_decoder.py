"""Decoders from latent programs to a gene-expression likelihood."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.nn import FCLayers
from torch import nn
from torch.distributions import Distribution, Normal, Poisson

Likelihood = Literal["nb", "zinb", "poisson", "normal"]
LoadingsActivation = Literal["relu", "softplus"]


class ProgramDecoder(nn.Module):
    """``p(x | z, cell line, batch)`` with a linear (gene programs) or MLP map.

    For count likelihoods the mean is ``library * softmax(f(z) + bias)``; for ``"normal"``
    (log-normalised data) it is ``f(z) + bias``. With ``decoder="linear"``,
    ``f(z) = z D^T`` and the columns of ``D`` (genes x programs) are the gene programs;
    ``nonnegative_loadings`` keeps them non-negative (each program raises its genes).

    Parameters
    ----------
    n_programs
        Number of latent programs ``K``.
    n_genes
        Number of genes ``G``.
    n_cell_lines
        Number of cell lines (each gets a gene bias).
    n_batch
        Number of batches (each gets a gene bias); ``0`` or ``1`` for none.
    decoder
        ``"linear"`` or ``"mlp"``.
    gene_likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"`` or ``"normal"``.
    nonnegative_loadings
        Non-negative loadings (linear decoder only).
    loadings_activation
        How non-negative loadings are parameterised: ``"relu"`` (default) lets a loading
        reach exactly zero, so that the L1 prior makes programs sparse; ``"softplus"`` (the
        earlier behaviour) keeps every loading positive, and under the L1 prior they
        shrink together instead of becoming sparse (``benchmarks/README.md``).
    n_hidden
        Hidden width of the MLP decoder.
    n_layers
        Hidden layers of the MLP decoder.
    """

    def __init__(
        self,
        n_programs: int,
        n_genes: int,
        n_cell_lines: int = 1,
        n_batch: int = 0,
        decoder: Literal["linear", "mlp"] = "linear",
        gene_likelihood: Likelihood = "nb",
        nonnegative_loadings: bool = True,
        loadings_activation: LoadingsActivation = "relu",
        n_hidden: int = 128,
        n_layers: int = 1,
    ):
        super().__init__()
        if loadings_activation not in ("relu", "softplus"):
            raise ValueError(
                f"loadings_activation must be 'relu' or 'softplus', got {loadings_activation!r}."
            )
        self.decoder = decoder
        self.gene_likelihood = gene_likelihood
        self.nonnegative_loadings = nonnegative_loadings
        self.loadings_activation = loadings_activation
        # saved with the model, so that one saved before "relu" existed loads as "softplus"
        self.register_buffer("relu_loadings", torch.tensor(loadings_activation == "relu"))
        self.line_bias = nn.Parameter(torch.zeros(max(n_cell_lines, 1), n_genes))
        self.batch_bias = nn.Parameter(torch.zeros(max(n_batch, 1), n_genes))
        if decoder == "linear":
            init = torch.randn(n_genes, n_programs) * 0.1
            if nonnegative_loadings:  # both start at softplus(-1 + noise), about 0.31
                init = init - 1.0
                if loadings_activation == "relu":
                    init = F.softplus(init)
            self.loadings_raw = nn.Parameter(init)
        elif decoder == "mlp":
            self.hidden = FCLayers(
                n_in=n_programs,
                n_out=n_hidden,
                n_layers=n_layers,
                n_hidden=n_hidden,
                dropout_rate=0.0,
                use_batch_norm=False,
                use_layer_norm=True,
            )
            self.out = nn.Linear(n_hidden, n_genes)
        else:
            raise ValueError(f"decoder must be 'linear' or 'mlp', got {decoder!r}.")
        self.log_dispersion = nn.Parameter(torch.zeros(n_genes))
        if gene_likelihood == "zinb":
            self.dropout_logits = nn.Parameter(torch.full((n_genes,), -2.0))
        if gene_likelihood not in ("nb", "zinb", "poisson", "normal"):
            raise ValueError(
                "gene_likelihood must be 'nb', 'zinb', 'poisson' or 'normal', "
                f"got {gene_likelihood!r}."
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Take the loadings' parameterisation from the saved state (softplus if absent)."""
        key = prefix + "relu_loadings"
        if key not in state_dict:  # saved before the relu parameterisation existed
            state_dict[key] = torch.tensor(False)
        self.loadings_activation = "relu" if bool(state_dict[key]) else "softplus"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def loadings(self) -> torch.Tensor:
        """Gene loadings ``D`` (genes x programs) of the linear decoder."""
        if self.decoder != "linear":
            raise AttributeError("Only the linear decoder has loadings.")
        if not self.nonnegative_loadings:
            return self.loadings_raw
        if self.loadings_activation == "relu":
            return F.relu(self.loadings_raw)
        return F.softplus(self.loadings_raw)

    def program_overlap(self) -> torch.Tensor:
        """Mean squared cosine similarity between the loadings of two different programs.

        0 when no two programs share a gene, 1 when all are copies of one; a program whose
        loadings are all zero counts as sharing nothing.
        """
        unit = F.normalize(self.loadings, dim=0)
        gram = unit.T @ unit
        n = gram.shape[0]
        off_diagonal = gram - torch.diag_embed(torch.diagonal(gram))
        return off_diagonal.pow(2).sum() / max(n * (n - 1), 1)

    def logits(
        self, z: torch.Tensor, cell_line: torch.Tensor, batch: torch.Tensor
    ) -> torch.Tensor:
        """Unnormalised log-expression (or the mean for ``"normal"``)."""
        if self.decoder == "linear":
            out = z @ self.loadings.T
        else:
            out = self.out(self.hidden(z))
        # one-hot products rather than indexing: deterministic gradients on CPU
        line = F.one_hot(cell_line.view(-1), self.line_bias.shape[0]).to(out.dtype)
        batch_ = F.one_hot(batch.view(-1), self.batch_bias.shape[0]).to(out.dtype)
        return out + line @ self.line_bias + batch_ @ self.batch_bias

    def forward(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        cell_line: torch.Tensor,
        batch: torch.Tensor,
    ) -> Distribution:
        """Likelihood of the counts given programs ``z`` and log library size ``library``."""
        logits = self.logits(z, cell_line, batch)
        if self.gene_likelihood == "normal":
            return Normal(logits, torch.exp(self.log_dispersion).clamp(min=1e-4))
        scale = torch.softmax(logits, dim=-1)
        rate = torch.exp(library) * scale
        theta = torch.exp(self.log_dispersion)
        if self.gene_likelihood == "nb":
            return NegativeBinomial(mu=rate, theta=theta, scale=scale)
        if self.gene_likelihood == "zinb":
            zi = self.dropout_logits.expand_as(rate)
            return ZeroInflatedNegativeBinomial(mu=rate, theta=theta, zi_logits=zi, scale=scale)
        return Poisson(rate)
