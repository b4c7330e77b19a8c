"""GIMModule: scVI encoder/decoder around a latent SCM driven by an intervention generator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from scvi.module._constants import MODULE_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import Encoder
from torch import nn
from torch.distributions import Normal

from gim_scvi._constants import GIM_REGISTRY_KEYS as KEYS
from gim_scvi.module._decoder import Likelihood, LoadingsActivation, ProgramDecoder
from gim_scvi.module._generator import (
    GeneratorEnsemble,
    InterventionGenerator,
    InterventionParams,
    bernoulli_kl,
    relaxed_bernoulli,
)
from gim_scvi.module._neighbours import feature_similarity, neighbour_weights
from gim_scvi.module._scm import GraphType, LatentSCM

PredictMode = Literal["map", "mean", "sample"]
NEIGHBOUR_BLOCK_VALUES = 1 << 22  # rows x seen x programs per block of neighbour mixing
# the training perturbations' feature rows and their own fits (sized by the number of rows)
SEEN_BUFFERS = (
    "seen_features",
    "seen_params",
    "seen_fitted",
    "seen_target_logits",
    "seen_targets_fitted",
)


class GIMModule(BaseModuleClass):
    """Generative intervention model over latent gene programs (pure torch).

    Parameters
    ----------
    n_input
        Number of genes.
    n_features
        Width of the perturbation feature vectors.
    n_programs
        Number of latent gene programs ``K``.
    n_cell_lines
        Number of cell lines.
    n_batch
        Number of batches (0 for none).
    graph
        ``"dag"``, ``"cyclic"`` or ``"none"`` (see :class:`~gim_scvi.module.LatentSCM`).
    decoder
        ``"linear"`` (columns are gene programs) or ``"mlp"``.
    gene_likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"`` or ``"normal"``.
    intervention
        ``"shift"`` or ``"shift+scale"`` (also change the targeted programs' exogenous scale).
    has_dose
        Whether a dose is registered (otherwise the dose response is 1).
    n_hidden, n_layers, dropout_rate
        Encoder (and MLP decoder) architecture.
    generator_bottleneck, generator_hidden, generator_layers, generator_dropout
        Architecture of the generator trained jointly with the latent model (see
        :class:`~gim_scvi.module.InterventionGenerator`).
    n_generators
        Members of each kind in the final generator ensemble
        (:class:`~gim_scvi.module.GeneratorEnsemble`, default 5), fitted after the joint
        training on the encoded training conditions (:meth:`gim_scvi.GIM.train`); 0 keeps the
        jointly trained generator.
    ensemble_bottleneck
        Width of the ensemble members' linear feature bottleneck (the rank of the linear
        members' maps).
    ensemble_layers
        Hidden layers of the ensemble members: one number for every member, or one per kind
        of member (``n_generators`` of each). The default ``(0, 1)``: low-rank linear maps
        and MLPs with one hidden layer of width ``generator_hidden`` that also see the cell
        line. Which kinds predict unseen perturbations is chosen on validation perturbations
        after training (:meth:`gim_scvi.GIM.select_ensemble_members`; without them, all
        members do). Linear maps extrapolate a smooth feature-to-mechanism map best; MLPs
        win where the mechanism is a non-linear function of a few feature directions, as on
        the synthetic sci-Plex screen (``benchmarks/README.md``).
    feature_components
        The generators read the standardised features projected onto their first
        ``feature_components`` principal components over the training perturbations (each
        perturbation once, each component scaled to unit variance;
        :meth:`set_feature_projection`; at most ``n_features``; default 16). ``None``: all
        ``n_features`` columns. With a thousand fingerprint bits and descriptors and a few
        hundred training drugs, a generator on all columns fits noise; on 16 components it
        extrapolates to unseen drugs better (``benchmarks/predictability_ceiling.py``). The
        neighbour similarity still uses every column.
    target_prior
        Prior probability ``rho`` that a perturbation targets a given program.
    target_kl_weight
        Weight ``beta_t`` of the per-context target KL.
    graph_l1
        Laplace-prior weight on the edge weights (counted once per data set). Edges compete
        with targets: without a real price on edges (the earlier default, 1) programs
        that few genes load become hubs with edges to many others, and each perturbation
        targets a hub instead of the programs it moves (``benchmarks/README.md``).
    loadings_l1
        Laplace-prior weight on the gene loadings (counted once per data set).
    nonnegative_loadings
        Keep the linear decoder's loadings non-negative.
    loadings_activation
        ``"relu"`` (loadings can be exactly zero: sparse programs) or ``"softplus"`` (see
        :class:`~gim_scvi.module.ProgramDecoder`).
    program_overlap_weight
        Weight of the mean squared cosine similarity between two programs' loadings
        (:meth:`~gim_scvi.module.ProgramDecoder.program_overlap`), added to the loss of every
        cell: it keeps programs from becoming copies of each other, which would split one
        program's interventions between them (linear decoder only).
    straight_through
        Hard target samples with relaxed gradients during training (otherwise the relaxed
        values themselves, which lets shift sizes learn while a target is still unlikely).
    shift_l1
        Laplace-prior weight on each context's shift vector ``a`` (a per-context term, like
        the target KL); it makes unneeded targets cost something.
    """

    def __init__(
        self,
        n_input: int,
        n_features: int,
        n_programs: int = 16,
        n_cell_lines: int = 1,
        n_batch: int = 0,
        graph: GraphType = "dag",
        decoder: Literal["linear", "mlp"] = "linear",
        gene_likelihood: Likelihood = "nb",
        intervention: Literal["shift", "shift+scale"] = "shift",
        has_dose: bool = True,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        generator_bottleneck: int = 64,
        generator_hidden: int = 128,
        generator_layers: int = 1,
        generator_dropout: float = 0.2,
        n_generators: int = 5,
        ensemble_bottleneck: int = 16,
        ensemble_layers: int | Sequence[int] = (0, 1),
        feature_components: int | None = 16,
        target_prior: float = 0.1,
        target_kl_weight: float = 5.0,
        graph_l1: float = 1000.0,
        loadings_l1: float = 200.0,
        nonnegative_loadings: bool = True,
        loadings_activation: LoadingsActivation = "relu",
        program_overlap_weight: float = 20.0,
        straight_through: bool = False,
        shift_l1: float = 0.0,
    ):
        super().__init__()
        if intervention not in ("shift", "shift+scale"):
            raise ValueError(
                f"intervention must be 'shift' or 'shift+scale', got {intervention!r}."
            )
        if not 0.0 < target_prior < 1.0:
            raise ValueError(f"target_prior must lie in (0, 1), got {target_prior}.")
        if feature_components is not None:
            if feature_components < 1:
                raise ValueError(
                    f"feature_components={feature_components}; use a positive number of "
                    "principal components, or None for every feature column."
                )
            feature_components = min(feature_components, n_features)
        self.n_input = n_input
        self.n_programs = n_programs
        self.n_cell_lines = max(n_cell_lines, 1)
        self.n_batch = n_batch
        self.gene_likelihood = gene_likelihood
        self.has_dose = has_dose
        self.target_prior = target_prior
        self.target_kl_weight = target_kl_weight
        self.graph_l1 = graph_l1
        self.loadings_l1 = loadings_l1
        self.program_overlap_weight = program_overlap_weight
        self.straight_through = straight_through
        self.shift_l1 = shift_l1
        self.temperature = 1.0

        encoder_cats = [self.n_cell_lines] + ([n_batch] if n_batch > 1 else [])
        self.encoder = Encoder(
            n_input,
            n_programs,
            n_cat_list=encoder_cats,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            return_dist=True,
        )
        self.decoder = ProgramDecoder(
            n_programs,
            n_input,
            n_cell_lines=self.n_cell_lines,
            n_batch=n_batch,
            decoder=decoder,
            gene_likelihood=gene_likelihood,
            nonnegative_loadings=nonnegative_loadings,
            loadings_activation=loadings_activation,
            n_hidden=n_hidden,
            n_layers=n_layers,
        )
        self.scm = LatentSCM(n_programs, graph=graph)
        shared = dict(
            n_features=feature_components or n_features,
            n_programs=n_programs,
            n_cell_lines=self.n_cell_lines,
            scale_intervention=intervention == "shift+scale",
        )
        # how each generator is built, kept to rebuild it as saved (see _match_saved_generators)
        self._generator_kwargs = {
            "joint_generator": dict(
                n_bottleneck=generator_bottleneck,
                n_hidden=generator_hidden,
                dropout_rate=generator_dropout,
                **shared,
            ),
            "generator": dict(
                n_bottleneck=ensemble_bottleneck, n_hidden=generator_hidden, **shared
            ),
        }
        self.joint_generator = GeneratorEnsemble(
            1, n_layers=generator_layers, **self._generator_kwargs["joint_generator"]
        )
        self.generator = None
        if n_generators > 0:
            self.generator = GeneratorEnsemble(
                n_generators, n_layers=ensemble_layers, **self._generator_kwargs["generator"]
            )
        # set once the ensemble has been fitted; until then the joint generator acts
        self.register_buffer("ensemble_fitted", torch.zeros((), dtype=torch.bool))
        # exogenous prior u ~ N(mu_c, diag sigma_u^2)
        self.basal_mean = nn.Embedding(self.n_cell_lines, n_programs)
        nn.init.zeros_(self.basal_mean.weight)
        self.log_exogenous_scale = nn.Parameter(torch.zeros(n_programs))
        # statistics of the training data, set by the model before training
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        # principal axes the generators read (columns; scaled to unit-variance components)
        self.register_buffer(
            "feature_projection",
            torch.eye(n_features)[:, :feature_components] if feature_components else None,
        )
        self.register_buffer("log_dose_center", torch.zeros(()))
        self.register_buffer("log_dose_scale", torch.ones(()))
        self.register_buffer("cells_per_context", torch.ones(()))
        self.register_buffer("log_library_mean", torch.full((self.n_cell_lines,), 8.0))
        self.register_buffer("log_library_sd", torch.full((self.n_cell_lines,), 0.5))
        # raw feature rows of the training perturbations (set by the model before training)
        self.register_buffer("seen_features", torch.zeros(0, n_features))
        # each seen perturbation's own shift, log EC50 and slope per cell line (fitted after
        # training by `gim_scvi.model._refit.refit_seen_perturbations`) and where they are set
        self.register_buffer("seen_params", torch.zeros(0, self.n_cell_lines, 3, n_programs))
        self.register_buffer("seen_fitted", torch.zeros(0, self.n_cell_lines, dtype=torch.bool))
        # and its target logits, fitted in the same step with the generator's target
        # probabilities as their prior, and where they are set (in models saved before they
        # were fitted, nowhere: the targets stay the generator's)
        self.register_buffer("seen_target_logits", torch.zeros(0, self.n_cell_lines, n_programs))
        self.register_buffer(
            "seen_targets_fitted", torch.zeros(0, self.n_cell_lines, dtype=torch.bool)
        )
        # share of an unseen perturbation's intervention distribution that is the mixture of
        # the seen ones' own interventions (weighted by softmax(similarity / temperature));
        # both chosen after training on validation perturbations (0: the ensemble alone)
        self.register_buffer("neighbour_weight", torch.zeros(()))
        self.register_buffer("neighbour_temperature", torch.full((), 0.05))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Size the seen-perturbation buffers to the saved ones (none in older models)."""
        for name in ("neighbour_weight", "neighbour_temperature"):  # older models: none
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        self._match_saved_generators(state_dict, prefix)
        n_seen = state_dict.get(prefix + "seen_features", self.seen_features[:0]).shape[0]
        for name in SEEN_BUFFERS:
            key = prefix + name
            buffer = getattr(self, name)
            if key not in state_dict:  # saved before it existed: nothing fitted
                state_dict[key] = buffer.new_zeros(
                    n_seen if name != "seen_features" else 0, *buffer.shape[1:]
                )
            setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _match_saved_generators(self, state_dict: dict, prefix: str) -> None:
        """Rebuild the feature projection and generators to the saved ones' shapes.

        Models saved before the defaults changed read every feature column
        (``feature_components=None``) with linear ensemble members only; their saved
        arguments do not say so, so the saved weights do.
        """
        projection = state_dict.get(prefix + "feature_projection")
        if projection is None:
            self.feature_projection = None
        elif self.feature_projection is None or self.feature_projection.shape != projection.shape:
            self.feature_projection = torch.empty_like(projection)
        n_inputs = self.feature_mean.shape[0] if projection is None else int(projection.shape[1])
        for name, kwargs in self._generator_kwargs.items():
            net = getattr(self, name)
            layers = _saved_member_layers(state_dict, f"{prefix}{name}.members.")
            if net is None or not layers:
                continue
            if layers == net.member_layers and n_inputs == kwargs["n_features"]:
                continue
            kinds = tuple(dict.fromkeys(layers))
            rebuilt = GeneratorEnsemble(
                len(layers) // len(kinds), n_layers=kinds, **{**kwargs, "n_features": n_inputs}
            )
            setattr(self, name, rebuilt.to(self.feature_mean.device))

    def set_seen_features(self, features: torch.Tensor) -> None:
        """Keep the training perturbations' feature rows; forgets any earlier per-row fit."""
        self.seen_features = features.float().to(self.seen_features.device)
        n_seen = features.shape[0]
        for name in SEEN_BUFFERS[1:]:
            buffer = getattr(self, name)
            setattr(self, name, buffer.new_zeros(n_seen, *buffer.shape[1:]))

    def seen_index(self, features: torch.Tensor) -> torch.Tensor:
        """Row of ``seen_features`` equal to each row of raw ``features`` (-1 if none)."""
        none = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        if self.seen_features.shape[0] == 0:
            return none
        distance = torch.cdist(
            features.float(),
            self.seen_features,
            compute_mode="donot_use_mm_for_euclid_dist",  # exact: equal rows give 0
        )
        closest = distance.min(dim=1)
        return torch.where(closest.values <= 1e-6, closest.indices, none)

    def seen_rows(self, features: torch.Tensor) -> torch.Tensor:
        """Which rows of raw ``features`` are exactly those of a training perturbation."""
        return self.seen_index(features) >= 0

    def with_seen_fits(
        self, params: InterventionParams, seen_index: torch.Tensor, cell_line: torch.Tensor
    ) -> InterventionParams:
        """``params`` with the intervention of fitted seen rows replaced by their own fit.

        Shift, log EC50 and slope are the fit's; so are the target logits (which programs a
        perturbation targets) where they were fitted too, otherwise (models saved before they
        were) they stay the generator's.
        """
        if self.seen_fitted.shape[0] == 0:
            return params
        index = seen_index.clamp(min=0)
        line = cell_line.view(-1)
        use = (seen_index >= 0) & self.seen_fitted[index, line]
        if not use.any():
            return params
        fitted = self.seen_params[index, line]  # n x 3 x K
        use = use[:, None]

        def pick(column: int, value: torch.Tensor) -> torch.Tensor:
            return torch.where(use, fitted[:, column], value)

        own_targets = use & self.seen_targets_fitted[index, line][:, None]
        logits = self.seen_target_logits[index, line]
        return params._replace(
            target_logits=torch.where(own_targets, logits, params.target_logits),
            shift=pick(0, params.shift),
            log_ec50=pick(1, params.log_ec50),
            slope=pick(2, params.slope),
        )

    # ------------------------------------------------------------------ interventions
    def standardise_features(self, features: torch.Tensor) -> torch.Tensor:
        """Generator input: raw features standardised with the training statistics.

        Projected onto the principal components when the module has ``feature_components``.
        """
        standardised = (features - self.feature_mean) / self.feature_std
        if self.feature_projection is None:
            return standardised
        return standardised @ self.feature_projection

    def set_feature_projection(self, seen_standardised: torch.Tensor) -> None:
        """Principal axes of the standardised training perturbations, one row per perturbation.

        Each perturbation counts once (not once per cell), so a drug with many cells does not
        decide the axes; the components are scaled to unit variance over these rows. With
        fewer perturbations than components, the components beyond their rank are zero.
        """
        if self.feature_projection is None:
            raise ValueError("The module was built without `feature_components`.")
        n_components = self.feature_projection.shape[1]
        centred = (seen_standardised - seen_standardised.mean(0)).double()
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        spread = singular[:n_components] / max(centred.shape[0] - 1, 1) ** 0.5
        # with fewer perturbations than components the last ones have no spread: they stay 0
        informative = spread > 1e-6 * spread[:1].clamp(min=1e-12)
        axes = torch.zeros_like(self.feature_projection, dtype=torch.float64)
        n_axes = min(n_components, vh.shape[0])
        axes[:, :n_axes] = vh[:n_axes].T * torch.where(
            informative, 1.0 / spread.clamp(min=1e-12), 0.0
        )
        self.feature_projection.copy_(axes.to(self.feature_projection.dtype))

    def standardise_log_dose(self, dose: torch.Tensor | None) -> torch.Tensor | None:
        """Standardised log dose (``None`` if the model has no dose)."""
        if not self.has_dose or dose is None:
            return None
        log_dose = torch.log(dose.clamp(min=1e-12))
        return (log_dose - self.log_dose_center) / self.log_dose_scale

    @property
    def active_generator(self) -> GeneratorEnsemble:
        """The fitted ensemble if there is one, otherwise the jointly trained generator.

        The ensemble acts for perturbations unseen in training; see :meth:`intervention`.
        """
        if self.generator is not None and bool(self.ensemble_fitted):
            return self.generator
        return self.joint_generator

    def intervention(
        self,
        features: torch.Tensor,
        dose: torch.Tensor | None,
        cell_line: torch.Tensor,
        mode: PredictMode | Literal["relaxed"] = "relaxed",
        generator: torch.Generator | None = None,
        use_seen: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """Intervention for each row of (raw features, dose, cell line).

        Parameters
        ----------
        features
            ``n x P`` raw perturbation features.
        dose
            ``n x 1`` doses (``None`` without a dose).
        cell_line
            ``n x 1`` cell-line codes.
        mode
            ``"relaxed"`` (training: relaxed sample from every member), ``"sample"`` (a random
            member per row, then hard Bernoulli draws), ``"mean"`` (``t = sigmoid(logit)``)
            or ``"map"`` (``t = 1[sigmoid(logit) > 0.5]``); except for ``"sample"`` the
            members' interventions are averaged.
        generator
            Random generator for ``"sample"`` / ``"relaxed"``.
        use_seen
            If ``False``, rows of training perturbations are treated like unseen ones (the
            feature-based ensemble for every row, no per-perturbation fit).

        Returns
        -------
        ``shift`` (``a``), ``log_scale`` (or ``None``), ``target_probs``, ``targets``,
        ``dose_response`` (each ``n x K``, mixed over the members) and ``target_kl`` (``n``:
        the members' mean KL of their target distributions to the sparse prior).

        Notes
        -----
        Once the ensemble is fitted, it acts for perturbations unseen in training, while a
        row whose features are exactly those of a training perturbation keeps the jointly
        trained generator, which fits each training perturbation (and so its response at a
        dose never measured) more closely than the ensemble. Where that
        perturbation's intervention has been fitted on its own cells in a cell line
        (``seen_fitted``, set after training), it replaces the generator's there: shift
        sizes, dose response and targets (fitted with the generator's as their prior). With
        ``neighbour_weight > 0`` (chosen after training on validation perturbations), an
        unseen row's intervention is that share of :meth:`neighbour_intervention` and the
        rest the ensemble's (``use_seen=False`` gives the ensemble's alone, for every row).
        """
        net = self.active_generator
        if mode == "relaxed" or not use_seen:
            return self._generated_intervention(net, features, dose, cell_line, mode, generator)
        seen_index = self.seen_index(features)
        if net is self.joint_generator:  # no ensemble: one pass, fits where there are some
            args = (features, dose, cell_line, mode, generator, seen_index)
            return self._generated_intervention(net, *args)
        out = self._generated_intervention(net, features, dose, cell_line, mode, generator)
        seen = seen_index >= 0
        out = self._with_neighbours(out, ~seen, features, dose, cell_line, mode, generator)
        if not seen.any():
            return out
        own = self._generated_intervention(
            self.joint_generator, features, dose, cell_line, mode, generator, seen_index
        )
        rows = seen[:, None]
        return {
            key: None
            if value is None
            else torch.where(rows if value.dim() == 2 else seen, own[key], value)
            for key, value in out.items()
        }

    def neighbour_intervention(
        self,
        features: torch.Tensor,
        dose: torch.Tensor | None,
        cell_line: torch.Tensor,
        mode: PredictMode,
        generator: torch.Generator | None = None,
        allowed: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
        """The mixture of the training perturbations' own interventions, by similarity.

        Each seen perturbation contributes its own fitted intervention in the row's cell
        line (targets, shift sizes and dose response, see :meth:`with_seen_fits`) with
        weight ``softmax(similarity / neighbour_temperature)``
        (:func:`~gim_scvi.module._neighbours.feature_similarity`). Only perturbations fitted
        in that cell line count, and never one with exactly the row's features (a seen
        perturbation is its own nearest neighbour).

        Parameters
        ----------
        features, dose, cell_line, mode, generator
            As in :meth:`intervention` (not ``"relaxed"``).
        allowed
            Optional ``n_seen`` boolean mask of the seen perturbations that may be used.

        Returns
        -------
        The fields of :meth:`intervention` except ``target_kl``, and which rows had at least
        one neighbour (rows without one get zeros).
        """
        by_line = self._seen_params_by_line()
        # blocks of rows with at most ~4M (rows x seen x programs) values per tensor, so the
        # memory stays bounded for any number of rows and seen perturbations
        block = max(1, NEIGHBOUR_BLOCK_VALUES // (self.seen_features.shape[0] * self.n_programs))
        parts = [
            self._neighbour_block(
                by_line,
                features[idx],
                None if dose is None else dose[idx],
                cell_line[idx],
                mode,
                generator,
                allowed,
            )
            for idx in torch.arange(features.shape[0], device=features.device).split(block)
        ]
        out = {
            key: None if parts[0][0][key] is None else torch.cat([p[0][key] for p in parts])
            for key in parts[0][0]
        }
        return out, torch.cat([p[1] for p in parts])

    def _seen_params_by_line(self) -> InterventionParams:
        """Every seen perturbation's intervention parameters in every line (lines x seen x K).

        The jointly trained generator's, replaced by the perturbation's own fit where it has
        one (:meth:`with_seen_fits`).
        """
        n_seen, n_lines = self.seen_features.shape[0], self.n_cell_lines
        device = self.seen_features.device
        lines = torch.arange(n_lines, device=device).repeat_interleave(n_seen)[:, None]
        seen_std = self.standardise_features(self.seen_features).repeat(n_lines, 1)
        params = self.with_seen_fits(
            self.joint_generator(seen_std, lines),
            torch.arange(n_seen, device=device).repeat(n_lines),
            lines,
        )
        return InterventionParams(
            *(None if v is None else v[0].view(n_lines, n_seen, -1) for v in params)
        )

    def _neighbour_block(
        self,
        by_line: InterventionParams,
        features: torch.Tensor,
        dose: torch.Tensor | None,
        cell_line: torch.Tensor,
        mode: PredictMode,
        generator: torch.Generator | None,
        allowed: torch.Tensor | None,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
        """:meth:`neighbour_intervention` for one block of rows."""
        n_seen = self.seen_features.shape[0]
        line = cell_line.view(-1)
        every_seen = torch.arange(n_seen, device=features.device)
        # seen x n x K: each seen perturbation's parameters in each row's line
        params = InterventionParams(
            *(None if v is None else v[line].transpose(0, 1) for v in by_line)
        )
        usable = self.seen_fitted[:, line].T & (self.seen_index(features)[:, None] != every_seen)
        if allowed is not None:
            usable = usable & allowed
        similarity = feature_similarity(features, self.seen_features, self.feature_std)
        weights = neighbour_weights(similarity, float(self.neighbour_temperature), usable)
        has_neighbour = usable.any(1)
        probs = torch.sigmoid(params.target_logits)  # seen x n x K
        if mode == "sample":  # one neighbour per row, drawn by its weight
            pick = torch.multinomial(
                torch.where(has_neighbour[:, None], weights, torch.ones_like(weights)),
                1,
                generator=generator,
            )[:, 0]
            weights = torch.nn.functional.one_hot(pick, n_seen).to(probs.dtype)
            weights = weights * has_neighbour[:, None]
        targets = point_or_drawn_targets(probs, mode, generator)
        share = weights.T[..., None]  # seen x n x 1
        out = mixture_fields(params, share, targets, self.standardise_log_dose(dose))
        return out, has_neighbour

    def _with_neighbours(
        self,
        out: dict[str, torch.Tensor | None],
        rows: torch.Tensor,
        features: torch.Tensor,
        dose: torch.Tensor | None,
        cell_line: torch.Tensor,
        mode: PredictMode,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor | None]:
        """``out`` with the chosen ``rows`` mixed with :meth:`neighbour_intervention`.

        A row takes ``neighbour_weight`` x the neighbours' mixture + the rest x ``out``; with
        ``mode="sample"`` it takes the neighbours' draw with that probability instead.
        """
        weight = float(self.neighbour_weight)
        if weight == 0.0 or self.seen_features.shape[0] == 0 or not rows.any():
            return out
        idx = torch.nonzero(rows, as_tuple=True)[0]
        neighbours, has_neighbour = self.neighbour_intervention(
            features[idx], None if dose is None else dose[idx], cell_line[idx], mode, generator
        )
        share = weight * has_neighbour.to(neighbours["shift"].dtype)[:, None]
        if mode == "sample":
            draw = torch.rand(share.shape, generator=generator, device=share.device)
            share = (draw < share).to(share.dtype)
        out = dict(out)
        for key, value in neighbours.items():
            if value is not None:
                mixed = out[key].clone()
                mixed[idx] = share * value + (1 - share) * out[key][idx]
                out[key] = mixed
        return out

    def _generated_intervention(
        self,
        net: GeneratorEnsemble,
        features: torch.Tensor,
        dose: torch.Tensor | None,
        cell_line: torch.Tensor,
        mode: PredictMode | Literal["relaxed"],
        generator: torch.Generator | None,
        seen_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """:meth:`intervention` from one generator ensemble.

        With ``seen_index`` (see :meth:`seen_index`), rows of seen perturbations take their
        fitted shift and dose response (:meth:`with_seen_fits`).
        """
        params = net(self.standardise_features(features), cell_line)
        if seen_index is not None:
            params = self.with_seen_fits(params, seen_index, cell_line)
        probs = torch.sigmoid(params.target_logits)  # members x n x K
        n_members, n_rows = probs.shape[:2]
        weight = probs.new_full((n_members, n_rows, 1), 1.0 / n_members)
        if mode == "relaxed":
            targets = relaxed_bernoulli(
                params.target_logits,
                self.temperature,
                hard=self.straight_through,
                generator=generator,
            )
        else:
            if mode == "sample" and n_members > 1:  # one member per row
                pick = torch.randint(
                    n_members, (n_rows,), generator=generator, device=probs.device
                )
                weight = torch.nn.functional.one_hot(pick, n_members).T[..., None].to(probs.dtype)
            targets = point_or_drawn_targets(probs, mode, generator)
        out = mixture_fields(params, weight, targets, self.standardise_log_dose(dose))
        out["target_kl"] = bernoulli_kl(params.target_logits, self.target_prior).sum(-1).mean(0)
        return out

    def _contextual_intervention(
        self,
        features: torch.Tensor,
        dose: torch.Tensor | None,
        cell_line: torch.Tensor,
        treated: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-cell intervention with one draw per context (features x dose x line).

        Returns the per-cell shift, log-scale change and target KL (zero for controls).
        """
        n_cells = features.shape[0]
        idx = torch.nonzero(treated, as_tuple=True)[0]
        if idx.numel() == 0:
            zeros = features.new_zeros(n_cells, self.n_programs)
            return zeros, None, features.new_zeros(n_cells)
        key_parts = [features[idx], cell_line[idx].to(features.dtype)]
        if dose is not None:
            key_parts.append(dose[idx])
        contexts, inverse = torch.unique(torch.cat(key_parts, dim=1), dim=0, return_inverse=True)
        n_feat = features.shape[1]
        ctx_dose = contexts[:, n_feat + 1 : n_feat + 2] if dose is not None else None
        ctx_line = contexts[:, n_feat : n_feat + 1].long()
        mode = "relaxed" if self.training else "mean"
        out = self.intervention(contexts[:, :n_feat], ctx_dose, ctx_line, mode=mode)
        kl = out["target_kl"] + self.shift_l1 * out["shift"].abs().sum(-1)
        # controls point at an extra all-zero context; rows are gathered by a one-hot matmul,
        # whose gradient is deterministic (indexed assignment accumulates in parallel on CPU)
        n_ctx = contexts.shape[0]
        cell_context = torch.full((n_cells,), n_ctx, dtype=torch.long, device=features.device)
        cell_context[idx] = inverse
        shift = gather_rows(_with_zero_row(out["shift"]), cell_context)
        log_scale = None
        if out["log_scale"] is not None:
            log_scale = gather_rows(_with_zero_row(out["log_scale"]), cell_context)
        target_kl = gather_rows(_with_zero_row(kl[:, None]), cell_context)[:, 0]
        return shift, log_scale, target_kl

    # ------------------------------------------------------------------ scvi-tools interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {
            MODULE_KEYS.X_KEY: tensors[KEYS.X_KEY],
            "cell_line": self._cell_line(tensors),
            MODULE_KEYS.BATCH_INDEX_KEY: self._batch(tensors),
        }

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict, **kwargs
    ) -> dict:
        features = tensors[KEYS.FEATURES_KEY]
        control = (features == 0).all(dim=1)
        if KEYS.CONTROL_KEY in tensors:
            control = control | (tensors[KEYS.CONTROL_KEY].view(-1) > 0)
        return {
            MODULE_KEYS.Z_KEY: inference_outputs[MODULE_KEYS.Z_KEY],
            MODULE_KEYS.LIBRARY_KEY: inference_outputs[MODULE_KEYS.LIBRARY_KEY],
            "features": features,
            "dose": tensors.get(KEYS.DOSE_KEY) if self.has_dose else None,
            "treated": ~control,
            "cell_line": self._cell_line(tensors),
            MODULE_KEYS.BATCH_INDEX_KEY: self._batch(tensors),
        }

    @staticmethod
    def _cell_line(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if KEYS.CELL_LINE_KEY in tensors:
            return tensors[KEYS.CELL_LINE_KEY].long()
        return torch.zeros_like(tensors[KEYS.X_KEY][:, :1], dtype=torch.long)

    @staticmethod
    def _batch(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if KEYS.BATCH_KEY in tensors:
            return tensors[KEYS.BATCH_KEY].long()
        return torch.zeros_like(tensors[KEYS.X_KEY][:, :1], dtype=torch.long)

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gene_likelihood == "normal" else torch.log1p(x)

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        cell_line: torch.Tensor,
        batch_index: torch.Tensor,
        n_samples: int = 1,
    ) -> dict:
        """``q(z | x, cell line, batch)`` and the observed log library size."""
        cats = [cell_line] + ([batch_index] if self.n_batch > 1 else [])
        qz, z = self.encoder(self._encoder_input(x), *cats)
        if n_samples > 1:
            z = qz.rsample((n_samples,))
        library = torch.log(x.sum(dim=1, keepdim=True).clamp(min=1.0))
        return {MODULE_KEYS.QZ_KEY: qz, MODULE_KEYS.Z_KEY: z, MODULE_KEYS.LIBRARY_KEY: library}

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        features: torch.Tensor,
        dose: torch.Tensor | None,
        treated: torch.Tensor,
        cell_line: torch.Tensor,
        batch_index: torch.Tensor,
    ) -> dict:
        """Likelihood of the counts and the interventional prior's parameters."""
        shift, log_scale, target_kl = self._contextual_intervention(
            features, dose, cell_line, treated
        )
        px = self.decoder(z, library, cell_line, batch_index)
        return {
            MODULE_KEYS.PX_KEY: px,
            "shift": shift,
            "log_scale": log_scale,
            "target_kl": target_kl,
        }

    def exogenous_prior(self, cell_line: torch.Tensor, log_scale: torch.Tensor | None) -> Normal:
        """``p(u | c, I) = N(mu_c, diag sigma_u^2)`` (scale changed where intervened)."""
        loc = gather_rows(self.basal_mean.weight, cell_line.view(-1))
        log_sd = self.log_exogenous_scale.expand_as(loc)
        if log_scale is not None:
            log_sd = log_sd + log_scale
        return Normal(loc, torch.exp(log_sd))

    def prior_log_prob(
        self,
        z: torch.Tensor,
        shift: torch.Tensor,
        log_scale: torch.Tensor | None,
        cell_line: torch.Tensor,
    ) -> torch.Tensor:
        """``log p(z | I, c) = log N(z A - a; mu_c, Sigma_u) + log |det A|`` per cell."""
        u = self.scm.abduct(z, shift)
        log_prob = self.exogenous_prior(cell_line, log_scale).log_prob(u).sum(-1)
        return log_prob + self.scm.log_abs_det()

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        dag_weight: float = 0.0,
        n_obs: int = 1,
    ) -> LossOutput:
        """Negative ELBO with the interventional prior, plus priors on graph and loadings.

        Per cell: ``-log p(x|z) + kl_weight * (log q(z|x) - log p(z|I,c))`` plus the context's
        target KL divided by the mean number of cells per context (a per-context term counted
        once per context). Once per data set (divided by ``n_obs``): L1 on ``W`` and on the
        loadings. Per cell as well: ``program_overlap_weight`` times the programs' overlap. The
        acyclicity penalty ``dag_weight * h(W)`` is a constraint, not a prior.
        """
        x = tensors[KEYS.X_KEY]
        qz = inference_outputs[MODULE_KEYS.QZ_KEY]
        z = inference_outputs[MODULE_KEYS.Z_KEY]
        px = generative_outputs[MODULE_KEYS.PX_KEY]
        cell_line = self._cell_line(tensors)

        reconstruction = -px.log_prob(x).sum(-1)
        log_q = qz.log_prob(z).sum(-1)
        log_p = self.prior_log_prob(
            z, generative_outputs["shift"], generative_outputs["log_scale"], cell_line
        )
        kl_z = log_q - log_p
        target_kl = (
            self.target_kl_weight * generative_outputs["target_kl"] / self.cells_per_context
        )
        kl_local = kl_weight * (kl_z + target_kl)

        global_prior = self.graph_l1 * self.scm.l1()
        overlap = torch.zeros((), device=x.device)
        if self.decoder.decoder == "linear":
            global_prior = global_prior + self.loadings_l1 * self.decoder.loadings.abs().sum()
            overlap = self.decoder.program_overlap()
        acyclicity = self.scm.acyclicity()
        loss = (
            torch.mean(reconstruction + kl_local)
            + global_prior / n_obs
            + self.program_overlap_weight * overlap
            + dag_weight * acyclicity
        )
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconstruction,
            kl_local={"kl_z": kl_z, "kl_targets": target_kl},
            kl_global=global_prior,
            extra_metrics={
                "kl_z": kl_z.mean().detach(),
                "kl_targets": target_kl.mean().detach(),
                "acyclicity": acyclicity.detach(),
                "graph_l1": self.scm.l1().detach(),
                "program_overlap": overlap.detach(),
                "temperature": torch.tensor(self.temperature),
                "dag_weight": torch.tensor(float(dag_weight)),
            },
        )

    # ------------------------------------------------------------------ counterfactuals
    @torch.inference_mode()
    def counterfactual(
        self,
        z_control: torch.Tensor,
        shift: torch.Tensor,
        log_scale: torch.Tensor | None,
        cell_line: torch.Tensor,
    ) -> torch.Tensor:
        """Programs of control cells under an intervention: abduct ``u``, intervene, solve.

        ``u = z A`` (controls have no intervention), optionally rescaled around ``mu_c`` by the
        intervention's scale change, then ``z* = (u + a) A^{-1}``.
        """
        u = self.scm.abduct(z_control)
        if log_scale is not None:
            mu = gather_rows(self.basal_mean.weight, cell_line.view(-1))
            u = mu + (u - mu) * torch.exp(log_scale)
        return self.scm.solve(u, shift)

    @torch.inference_mode()
    def sample_exogenous(
        self, cell_line: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``u`` from the exogenous prior of each row's cell line."""
        prior = self.exogenous_prior(cell_line, None)
        noise = torch.randn(prior.loc.shape, generator=generator, device=prior.loc.device)
        return prior.loc + prior.scale * noise


def point_or_drawn_targets(
    probs: torch.Tensor, mode: PredictMode, generator: torch.Generator | None
) -> torch.Tensor:
    """Targets for a prediction mode: probabilities, their MAP, or Bernoulli draws."""
    if mode == "sample":
        return torch.bernoulli(probs, generator=generator)
    if mode == "mean":
        return probs
    if mode == "map":
        return (probs > 0.5).to(probs.dtype)
    raise ValueError(f"mode must be 'map', 'mean' or 'sample', got {mode!r}.")


def mixture_fields(
    params: InterventionParams,
    share: torch.Tensor,
    targets: torch.Tensor,
    log_dose: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """Fields of a mixture of interventions.

    ``params`` and ``targets`` are ``sources x n x K`` (ensemble members or seen
    perturbations), ``share`` each source's weight per row (``sources x n x 1``).
    """
    response = InterventionGenerator.dose_response(params, log_dose)
    strength = targets * response

    def mix(values: torch.Tensor) -> torch.Tensor:
        return (share * values).sum(0)

    return {
        "shift": mix(strength * params.shift),
        "log_scale": None if params.log_scale is None else mix(strength * params.log_scale),
        "target_probs": mix(torch.sigmoid(params.target_logits)),
        "targets": mix(targets),
        "dose_response": mix(response),
    }


def _saved_member_layers(state_dict: dict, members_prefix: str) -> list[int]:
    """Hidden layers of each saved generator member, from the keys of its weights."""
    layers: dict[int, set[str]] = {}
    for key in state_dict:
        if key.startswith(members_prefix):
            member, _, rest = key[len(members_prefix) :].partition(".")
            names = layers.setdefault(int(member), set())
            if rest.startswith("mlp.fc_layers."):
                names.add(rest.split(".")[2])
    return [len(layers[i]) for i in sorted(layers)]


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` as a one-hot matrix product (deterministic gradient on CPU)."""
    one_hot = torch.nn.functional.one_hot(index.view(-1), num_classes=values.shape[0])
    return one_hot.to(values.dtype) @ values


def _with_zero_row(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.new_zeros(1, values.shape[1])])
