"""The generative intervention model: perturbation features -> distribution over interventions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from scvi.nn import FCLayers
from torch import nn


class InterventionParams(NamedTuple):
    """Per-context intervention distribution (all ``n_contexts x K``)."""

    target_logits: torch.Tensor
    shift: torch.Tensor
    log_ec50: torch.Tensor
    slope: torch.Tensor
    log_scale: torch.Tensor | None


def relaxed_bernoulli(
    logits: torch.Tensor,
    temperature: float,
    hard: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gumbel-sigmoid (concrete) sample of Bernoulli variables.

    Parameters
    ----------
    logits
        Bernoulli logits.
    temperature
        Relaxation temperature; lower is closer to a hard sample.
    hard
        Return a hard ``{0, 1}`` sample with the relaxed gradient (straight-through);
        otherwise the relaxed value in ``(0, 1)``.
    generator
        Optional random generator for reproducible draws.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    uniform = uniform.clamp(1e-6, 1 - 1e-6)
    noise = torch.log(uniform) - torch.log1p(-uniform)
    soft = torch.sigmoid((logits + noise) / temperature)
    if not hard:
        return soft
    sample = (soft > 0.5).to(soft.dtype)
    return sample + soft - soft.detach()


def bernoulli_kl(logits: torch.Tensor, prior_prob: float) -> torch.Tensor:
    """``KL(Bern(sigmoid(logits)) || Bern(prior_prob))``, elementwise."""
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    rho = torch.as_tensor(prior_prob, device=logits.device)
    return p * (log_p - torch.log(rho)) + (1 - p) * (log_1mp - torch.log1p(-rho))


class InterventionGenerator(nn.Module):
    """MLP ``h(features, cell line) -> (target logits, shifts, dose response)`` per program.

    The features pass through a linear bottleneck (shared low-rank structure across
    perturbations), then an MLP with dropout that also sees the cell line.

    Parameters
    ----------
    n_features
        Width ``P`` of the perturbation feature vectors.
    n_programs
        Number of latent programs ``K``.
    n_cell_lines
        Number of cell lines (basal covariate categories).
    n_bottleneck
        Width of the linear feature bottleneck.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout on the bottleneck and hidden layers.
    scale_intervention
        Also output a change of the targeted programs' exogenous log-scale.
    """

    def __init__(
        self,
        n_features: int,
        n_programs: int,
        n_cell_lines: int = 1,
        n_bottleneck: int = 64,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.2,
        scale_intervention: bool = False,
    ):
        super().__init__()
        self.n_programs = n_programs
        self.scale_intervention = scale_intervention
        self.bottleneck = nn.Sequential(
            nn.Linear(n_features, n_bottleneck), nn.Dropout(dropout_rate)
        )
        self.mlp = FCLayers(
            n_in=n_bottleneck,
            n_out=n_hidden,
            n_cat_list=[n_cell_lines] if n_cell_lines > 1 else None,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=False,
            use_layer_norm=True,
        )
        n_heads = 5 if scale_intervention else 4
        self.heads = nn.Linear(n_hidden, n_heads * n_programs)
        with torch.no_grad():
            self.heads.weight.mul_(0.1)
            self.heads.bias.zero_()

    def forward(self, features: torch.Tensor, cell_line: torch.Tensor) -> InterventionParams:
        """Intervention parameters for ``n_contexts`` rows of standardised features.

        Parameters
        ----------
        features
            ``n_contexts x P`` standardised perturbation features.
        cell_line
            ``n_contexts x 1`` integer cell-line codes.
        """
        hidden = self.mlp(self.bottleneck(features), cell_line)
        out = self.heads(hidden).view(features.shape[0], -1, self.n_programs)
        return InterventionParams(
            target_logits=out[:, 0],
            shift=out[:, 1],
            log_ec50=out[:, 2],
            slope=F.softplus(out[:, 3] + 1.0) + 0.1,
            log_scale=out[:, 4] if self.scale_intervention else None,
        )

    @staticmethod
    def dose_response(params: InterventionParams, log_dose: torch.Tensor | None) -> torch.Tensor:
        """``r_k(d) = sigmoid(n_k (log d - log EC50_k))``; ones when there is no dose.

        Parameters
        ----------
        params
            Output of :meth:`forward`.
        log_dose
            ``n_contexts x 1`` standardised log dose, or ``None``.
        """
        if log_dose is None:
            return torch.ones_like(params.shift)
        return torch.sigmoid(params.slope * (log_dose - params.log_ec50))
