"""The generative intervention model: perturbation features -> distribution over interventions."""

from __future__ import annotations

from collections.abc import Sequence
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
    """Map ``h(features, cell line) -> (target logits, shifts, dose response)`` per program.

    The features pass through a linear bottleneck (shared low-rank structure across
    perturbations). With ``n_layers=0`` (the default) the heads read the bottleneck directly
    and each cell line adds its own offset: the intervention parameters are a low-rank linear
    function of the features, which extrapolates to unseen perturbations better than an MLP
    when only a few hundred perturbations are seen. With ``n_layers >= 1`` an MLP with
    dropout, which also sees the cell line, sits between bottleneck and heads.

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
        Width of the hidden layers (``n_layers >= 1``).
    n_layers
        Number of hidden layers; 0 for the linear map.
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
        n_bottleneck: int = 16,
        n_hidden: int = 128,
        n_layers: int = 0,
        dropout_rate: float = 0.0,
        scale_intervention: bool = False,
    ):
        super().__init__()
        self.n_programs = n_programs
        self.scale_intervention = scale_intervention
        n_heads = 5 if scale_intervention else 4
        self.bottleneck = nn.Sequential(
            nn.Linear(n_features, n_bottleneck), nn.Dropout(dropout_rate)
        )
        self.mlp = None
        self.line_offset = None
        n_head_in = n_bottleneck
        if n_layers > 0:
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
            n_head_in = n_hidden
        elif n_cell_lines > 1:
            self.line_offset = nn.Embedding(n_cell_lines, n_heads * n_programs)
        self.heads = nn.Linear(n_head_in, n_heads * n_programs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh random weights; the heads start small (interventions start near zero)."""
        for layer in self.modules():
            if layer is not self and hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        with torch.no_grad():
            self.heads.weight.mul_(0.1)
            self.heads.bias.zero_()
            if self.line_offset is not None:
                self.line_offset.weight.zero_()

    def forward(self, features: torch.Tensor, cell_line: torch.Tensor) -> InterventionParams:
        """Intervention parameters for ``n_contexts`` rows of standardised features.

        Parameters
        ----------
        features
            ``n_contexts x P`` standardised perturbation features.
        cell_line
            ``n_contexts x 1`` integer cell-line codes.
        """
        hidden = self.bottleneck(features)
        if self.mlp is not None:
            hidden = self.mlp(hidden, cell_line)
        out = self.heads(hidden)
        if self.line_offset is not None:
            out = out + self.line_offset(cell_line.view(-1))
        out = out.view(features.shape[0], -1, self.n_programs)
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
            Output of :meth:`forward` (any leading shape).
        log_dose
            ``n_contexts x 1`` standardised log dose, or ``None``.
        """
        if log_dose is None:
            return torch.ones_like(params.shift)
        return torch.sigmoid(params.slope * (log_dose - params.log_ec50))


class GeneratorEnsemble(nn.Module):
    """Several :class:`InterventionGenerator` members whose interventions are averaged.

    The intervention distribution of a perturbation is the equal-weight mixture of the
    active members' distributions: its expected shift is their mean, and a draw picks a
    member and then that member's targets. Members trained from different starting points
    disagree where the training perturbations say little (unseen drugs far from the seen
    ones), so the mixture hedges there and its spread is a measure of that uncertainty.

    Members can be of several kinds (their number of hidden layers): ``n_layers=(0, 1)``
    gives ``n_members`` low-rank linear maps and ``n_members`` one-layer MLPs. Which kinds
    act is a saved buffer (:meth:`set_active_kinds`; all by default), so a choice made after
    fitting (:meth:`gim_scvi.GIM.select_ensemble_members`) travels with the model.

    Parameters
    ----------
    n_members
        Number of members of each kind.
    n_layers
        Hidden layers of the members: one number for all, or one per kind.
    **kwargs
        Passed to every :class:`InterventionGenerator`.
    """

    def __init__(self, n_members: int = 1, n_layers: int | Sequence[int] = 0, **kwargs):
        super().__init__()
        if n_members < 1:
            raise ValueError(f"n_members must be at least 1, got {n_members}.")
        kinds = (n_layers,) if isinstance(n_layers, int) else tuple(int(v) for v in n_layers)
        if not kinds or len(set(kinds)) != len(kinds) or min(kinds) < 0:
            raise ValueError(
                f"n_layers must be a number >= 0 or distinct numbers >= 0, got {n_layers!r}."
            )
        self.kinds = kinds
        self.member_layers = [layers for layers in kinds for _ in range(n_members)]
        self.members = nn.ModuleList(
            InterventionGenerator(n_layers=layers, **kwargs) for layers in self.member_layers
        )
        self.register_buffer("active", torch.ones(len(self.members), dtype=torch.bool))

    def __len__(self) -> int:
        return len(self.members)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Models saved before members could be switched off: all act."""
        state_dict.setdefault(prefix + "active", self.active.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def members_of_kind(self, n_layers: int) -> list[int]:
        """Indices of the members with ``n_layers`` hidden layers."""
        return [i for i, layers in enumerate(self.member_layers) if layers == n_layers]

    def set_active_kinds(self, kinds: Sequence[int] | None = None) -> None:
        """Let only the members of these kinds (numbers of hidden layers) act; ``None``: all."""
        kinds = self.kinds if kinds is None else tuple(int(v) for v in kinds)
        unknown = sorted(set(kinds) - set(self.kinds))
        if not kinds or unknown:
            raise ValueError(
                f"The ensemble has members with {list(self.kinds)} hidden layers; "
                f"cannot activate {list(kinds)}."
            )
        active = [layers in kinds for layers in self.member_layers]
        self.active.copy_(torch.as_tensor(active, device=self.active.device))

    @property
    def active_kinds(self) -> tuple[int, ...]:
        """Kinds (numbers of hidden layers) of the members that act."""
        on = {v for v, a in zip(self.member_layers, self.active.tolist(), strict=True) if a}
        return tuple(kind for kind in self.kinds if kind in on)

    def forward(self, features: torch.Tensor, cell_line: torch.Tensor) -> InterventionParams:
        """Active members' parameters, stacked: each field is ``n_active x n_contexts x K``."""
        outs = [
            member(features, cell_line)
            for member, active in zip(self.members, self.active.tolist(), strict=True)
            if active
        ]
        return InterventionParams(
            *(
                None if fields[0] is None else torch.stack(fields)
                for fields in zip(*outs, strict=True)
            )
        )

    dose_response = staticmethod(InterventionGenerator.dose_response)
