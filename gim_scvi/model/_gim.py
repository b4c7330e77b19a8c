"""GIM: the scvi-tools model class."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalObsField,
    LayerField,
    NumericalObsField,
    ObsmField,
)
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from gim_scvi._constants import GIM_REGISTRY_KEYS as KEYS
from gim_scvi._utils import context_labels, first_non_count_rows
from gim_scvi.model import _validation as check
from gim_scvi.model._checkpoint import prepare_checkpointing, split_fingerprint
from gim_scvi.model._features import FeatureRows, feature_rows, zero_rows
from gim_scvi.model._neighbours import (
    DEFAULT_TEMPERATURES,
    DEFAULT_WEIGHTS,
    select_ensemble_members,
    select_neighbour_mixture,
    unseen_validation_cells,
    validation_scorer,
)
from gim_scvi.model._refit import (
    context_residuals,
    encode_cells,
    refit_generator,
    refit_graph,
    refit_seen_perturbations,
)
from gim_scvi.model._trainingplan import GIMTrainingPlan
from gim_scvi.module import GIMModule

logger = logging.getLogger(__name__)


class GIM(UnsupervisedTrainingMixin, VAEMixin, BaseModelClass):
    """Generative Intervention Model for unseen perturbations.

    A generator maps perturbation features (plus dose and cell line) to a distribution over
    sparse atomic interventions on ``n_programs`` latent gene programs, which are related by a
    learned causal graph; scVI components encode and decode the counts
    (Schneider et al., ICML 2025).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; ``None`` with ``registry`` (loading).
    registry
        A saved registry (used by :meth:`load` with ``adata=False``).
    n_programs
        Number of latent gene programs.
    graph
        ``"dag"`` (acyclic, the default), ``"cyclic"`` (steady state) or ``"none"``
        (ablation without causal structure).
    decoder
        ``"linear"`` (gene programs are the decoder's columns) or ``"mlp"``.
    gene_likelihood
        ``"nb"``, ``"zinb"``, ``"poisson"`` (counts) or ``"normal"`` (log-normalised data).
    intervention
        ``"shift"`` or ``"shift+scale"``.
    binary_features
        How feature columns that are all 0/1 in training (fingerprint bits) enter the
        generator: ``"standardize"`` (centred and divided by their standard deviation, like
        every other column; a bit set in few training drugs becomes a large input) or
        ``"center"`` (centred only, kept on the 0/1 scale). Other columns are always
        standardised with training-cell statistics.
    **module_kwargs
        Passed to :class:`~gim_scvi.module.GIMModule` (generator size, priors, ...).

    Examples
    --------
    >>> adata = gim_scvi.data.synthetic()
    >>> gim_scvi.GIM.setup_anndata(adata, features_key="drug_features", dose_key="dose",
    ...                            control_key="control", perturbation_key="condition",
    ...                            cell_line_key="cell_line")
    >>> model = gim_scvi.GIM(adata)
    >>> model.train(max_epochs=50, split_key="split")
    >>> pred = model.predict(features=new_drug_features, doses=[1e3, 1e4])
    """

    _module_cls = GIMModule
    _training_plan_cls = GIMTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_programs: int = 16,
        graph: Literal["dag", "cyclic", "none"] = "dag",
        decoder: Literal["linear", "mlp"] = "linear",
        gene_likelihood: Literal["nb", "zinb", "poisson", "normal"] = "nb",
        intervention: Literal["shift", "shift+scale"] = "shift",
        binary_features: Literal["standardize", "center"] = "standardize",
        **module_kwargs,
    ):
        super().__init__(adata, registry)
        if binary_features not in ("standardize", "center"):
            raise ValueError(
                f"binary_features={binary_features!r}; use 'standardize' or 'center'."
            )
        self.binary_features = binary_features
        n_features = self.summary_stats[f"n_{KEYS.FEATURES_KEY}"]
        n_cell_lines = self._n_categories(KEYS.CELL_LINE_KEY)
        n_batch = self._n_categories(KEYS.BATCH_KEY)
        if adata is not None and gene_likelihood != "normal":
            _check_counts(adata, self.registry_["setup_args"]["layer"])
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_features=n_features,
            n_programs=n_programs,
            n_cell_lines=n_cell_lines,
            n_batch=n_batch if n_batch > 1 else 0,
            graph=graph,
            decoder=decoder,
            gene_likelihood=gene_likelihood,
            intervention=intervention,
            has_dose=self.registry_["setup_args"]["dose_key"] is not None,
            **module_kwargs,
        )
        self.graph_pruning_: dict[str, int] = {}
        self.gim_version_ = _package_version()
        self.train_params_: dict = {}
        self._model_summary_string = (
            f"GIM with {n_programs} programs, graph={graph!r}, decoder={decoder!r}, "
            f"gene_likelihood={gene_likelihood!r}, intervention={intervention!r}; "
            f"{n_features} perturbation features, {n_cell_lines} cell line(s)."
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ registration
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        features_key: str,
        control_key: str | None = None,
        dose_key: str | None = None,
        perturbation_key: str | None = None,
        cell_line_key: str | None = None,
        batch_key: str | None = None,
        layer: str | None = None,
        **kwargs,
    ):
        """Register an AnnData with perturbation features for :class:`GIM`.

        A cell whose feature row is all zero is a control, as is every cell flagged in
        ``control_key``; all other cells are perturbed and need a positive dose when
        ``dose_key`` is given.

        Parameters
        ----------
        %(param_adata)s
        features_key
            Key in ``adata.obsm`` of the perturbation features (cells x P; zeros for controls).
        control_key
            Optional boolean / 0-1 column of ``adata.obs`` flagging control (vehicle) cells.
        dose_key
            Optional numeric column of ``adata.obs`` with the dose (any positive unit; the model
            works on its logarithm).
        perturbation_key
            Optional column of ``adata.obs`` naming each cell's perturbation (used for reports).
        cell_line_key
            Optional categorical column of ``adata.obs`` with the cell line / basal state.
        %(param_batch_key)s
        %(param_layer)s
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check.check_adata_shape(adata)
        check.check_layer(adata, layer)
        features = check.check_obsm_features(adata, features_key)
        for key, name in [
            (control_key, "control_key"),
            (dose_key, "dose_key"),
            (perturbation_key, "perturbation_key"),
            (cell_line_key, "cell_line_key"),
            (batch_key, "batch_key"),
        ]:
            check.check_obs_key(adata, key, name)
        check.check_categories(adata, cell_line_key, "cell_line_key")
        check.check_categories(adata, batch_key, "batch_key")
        control = zero_rows(features)
        if control_key is not None:
            flags = check.control_flags(adata, control_key)
            check.check_control_agreement(
                adata, flags, control, control_key, features_key, perturbation_key
            )
            control |= flags
        if dose_key is not None:
            check.check_doses(adata, dose_key, ~control)
        fields = [
            LayerField(KEYS.X_KEY, layer, is_count_data=False),
            ObsmField(KEYS.FEATURES_KEY, features_key),
        ]
        if control_key is not None:
            fields.append(NumericalObsField(KEYS.CONTROL_KEY, control_key))
        if dose_key is not None:
            fields.append(NumericalObsField(KEYS.DOSE_KEY, dose_key))
        if cell_line_key is not None:
            fields.append(CategoricalObsField(KEYS.CELL_LINE_KEY, cell_line_key))
        if batch_key is not None:
            fields.append(CategoricalObsField(KEYS.BATCH_KEY, batch_key))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _n_categories(self, key: str) -> int:
        if key not in self.registry_["field_registries"]:
            return 1
        return len(self.get_state_registry(key).categorical_mapping)

    @property
    def cell_lines(self) -> list[str]:
        """Registered cell lines (a single ``"all"`` when no ``cell_line_key`` was given)."""
        if KEYS.CELL_LINE_KEY not in self.registry_["field_registries"]:
            return ["all"]
        return [str(c) for c in self.get_state_registry(KEYS.CELL_LINE_KEY).categorical_mapping]

    @property
    def program_names(self) -> list[str]:
        """Names of the latent programs."""
        return [f"program_{k}" for k in range(self.module.n_programs)]

    # ------------------------------------------------------------------ registered data access
    def _setup_arg(self, name: str):
        return self.registry_["setup_args"].get(name)

    def _features(self, adata: AnnData) -> FeatureRows:
        """The registered per-cell features as distinct rows + index (never densified)."""
        return feature_rows(adata.obsm[self._setup_arg("features_key")])

    def _control_mask(self, adata: AnnData, features: FeatureRows | None = None) -> np.ndarray:
        if features is None:  # the mask alone needs no distinct rows
            control = zero_rows(adata.obsm[self._setup_arg("features_key")])
        else:
            control = features.zero_rows()
        if self._setup_arg("control_key") is not None:
            control |= check.control_flags(adata, self._setup_arg("control_key"))
        return control

    def _doses(self, adata: AnnData) -> np.ndarray | None:
        key = self._setup_arg("dose_key")
        if key is None:
            return None
        return pd.to_numeric(adata.obs[key], errors="coerce").to_numpy(dtype=np.float32)

    def _cell_line_codes(self, adata: AnnData) -> np.ndarray:
        key = self._setup_arg("cell_line_key")
        if key is None:
            return np.zeros(adata.n_obs, dtype=np.int64)
        return _codes(adata.obs[key], self.cell_lines, "cell line", key)

    def _batch_codes(self, adata: AnnData) -> np.ndarray:
        key = self._setup_arg("batch_key")
        if key is None:
            return np.zeros(adata.n_obs, dtype=np.int64)
        mapping = [str(c) for c in self.get_state_registry(KEYS.BATCH_KEY).categorical_mapping]
        return _codes(adata.obs[key], mapping, "batch", key)

    def _perturbation_names(
        self, adata: AnnData, features: FeatureRows | None = None
    ) -> np.ndarray:
        key = self._setup_arg("perturbation_key")
        if key is not None:
            return adata.obs[key].astype(str).to_numpy()
        features = self._features(adata) if features is None else features
        return np.char.add("perturbation_", features.inverse.astype(str))

    def align_genes(self, adata: AnnData) -> AnnData:
        """Return ``adata`` with the model's genes in the model's order.

        The same AnnData if the order already matches; a reordered copy if it holds the same
        genes in another order; an error naming the differences otherwise.
        """
        genes = self._var_names()
        if adata.var_names.equals(genes):
            return adata
        missing = genes.difference(adata.var_names)
        extra = adata.var_names.difference(genes)
        if len(missing) or len(extra):
            raise ValueError(
                f"The AnnData's genes differ from the model's: {len(missing)} of the model's "
                f"{len(genes)} genes are missing (e.g. {missing[:3].tolist()}) and {len(extra)} "
                f"are not in the model (e.g. {extra[:3].tolist()}). Subset or pad the AnnData "
                "to the model's genes (`model.adata.var_names`) first."
            )
        logger.info("Reordering the AnnData's genes to the model's order (a copy).")
        return adata[:, genes].copy()

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        split_key: str | None = None,
        train_split: str = "train",
        validation_split: str | None = None,
        batch_size: int = 256,
        lr: float = 2e-3,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        graph_threshold: float = 0.05,
        kl_warmup_fraction: float = 0.25,
        checkpoint_dir: str | os.PathLike | None = None,
        generator_refit_steps: int = 600,
        generator_refit_kwargs: dict | None = None,
        graph_refit: bool = True,
        graph_refit_kwargs: dict | None = None,
        neighbour_selection: bool = True,
        **trainer_kwargs,
    ):
        """Train the model; held-out conditions never influence the weights.

        Encoder, decoder, causal graph and intervention generator are trained jointly on the
        ELBO (``max_epochs`` passes over the cells). Then comes a second stage on the encoded
        training conditions, with encoder and decoder fixed (seconds): the causal graph is
        fitted afresh as the DAG under which the conditions' interventions are sparsest
        (``graph_refit``), each training perturbation's shift sizes and dose response are
        fitted on its own cells, and each member of the generator ensemble (``n_generators``
        of each kind, default 5 low-rank linear maps and 5 MLPs on the features' principal
        components) is fitted afresh (``generator_refit_steps`` full-batch steps); the
        ensemble makes every prediction of an unseen perturbation from then on. If the
        validation cells hold perturbations never trained on, they choose which kind of
        member predicts (:meth:`select_ensemble_members`) and how much the interventions of
        similar seen perturbations are mixed in (``neighbour_selection``). See
        ``benchmarks/README.md`` for what the second stage does.

        Parameters
        ----------
        max_epochs
            Number of passes through the training cells (default: scaled to the data size,
            ``clip(2e6 / n_train, 20, 400)``).
        split_key
            Column of ``adata.obs`` assigning each cell to a split. Cells whose value is
            ``train_split`` are trained on, those equal to ``validation_split`` form the
            validation set (use whole held-out perturbations there), all others are a test set
            that is never seen. ``None`` trains on every cell.
        train_split
            Value of ``split_key`` for training cells.
        validation_split
            Value of ``split_key`` for validation cells (optional).
        batch_size
            Minibatch size.
        lr
            Learning rate.
        early_stopping
            Stop when the validation ELBO stops improving (needs ``validation_split``).
        plan_kwargs
            Passed to :class:`~gim_scvi.model.GIMTrainingPlan` (schedules, weight decay).
        datasplitter_kwargs
            Passed to :class:`~scvi.dataloaders.DataSplitter`.
        graph_threshold
            For ``graph="dag"``: edges with ``|w|`` at or below this are removed after training,
            then cycles are broken at their weakest edge, so the graph is exactly acyclic.
        kl_warmup_fraction
            Fraction of the epochs over which the KL terms are warmed up from 0 to 1
            (``plan_kwargs["n_epochs_kl_warmup"]`` overrides it).
        checkpoint_dir
            Folder for a checkpoint after every epoch (``last.ckpt``). If it already holds
            the checkpoint of an interrupted run, training resumes from there: same split
            (checked), same planned epochs, and the annealing schedules continue where they
            stopped. Create the model the same way (same AnnData set-up and ``__init__``
            arguments) before resuming.
        generator_refit_steps
            Adam steps of the second stage for each ensemble member (models created with
            ``n_generators > 0``); 0 keeps the jointly trained generator and skips the whole
            second stage. The second stage also fits each training perturbation's shift
            sizes and dose response per cell line on its own cells, its targets kept
            (:func:`~gim_scvi.model._refit.refit_seen_perturbations`; a few seconds).
        generator_refit_kwargs
            ``lr`` (default 3e-3), ``weight_decay`` and ``temperature`` of the second stage.
            ``weight_decay``: one L2 penalty for every member, or ``(low, high)`` spread
            geometrically across the members (default ``(0.01, 0.1)``; see
            :func:`~gim_scvi.model._refit.member_weight_decays`). ``temperature``: of the
            relaxed target draws, one value or ``(low, high)`` in the same way (default
            ``(0.2, 1.0)``; see :func:`~gim_scvi.model._refit.refit_generator`).
        graph_refit
            For ``graph="dag"``: in the second stage, refit the causal graph from scratch on
            the encoded training conditions (:func:`~gim_scvi.model._refit.refit_graph`)
            before the interventions are refitted; ``False`` keeps the jointly trained graph
            (so does ``generator_refit_steps=0``, which skips the whole second stage).
        graph_refit_kwargs
            ``l1`` (default 0.01), ``n_steps`` (3000) and ``lr`` (0.01) of the graph refit;
            its pruning threshold is ``graph_threshold``.
        neighbour_selection
            If the ``validation_split`` cells include perturbations that are not trained on,
            choose on them, after the second stage, which kind of ensemble member predicts
            unseen perturbations (:meth:`select_ensemble_members`), then how much an unseen
            perturbation's intervention borrows from the most similar seen ones
            (:meth:`select_neighbour_mixture`); otherwise, or with ``False``, every member
            acts and unseen perturbations take the generator ensemble's intervention alone.
        **trainer_kwargs
            Passed to :class:`~scvi.train.Trainer` (``accelerator``, ``devices``,
            ``strategy``, ...). Several processes: ``accelerator="cpu"`` or ``"gpu"``,
            ``devices=N`` and ``strategy="ddp_find_unused_parameters_true"`` (from a script,
            not a notebook; each process trains on its share of the minibatches).
        """
        _check_refit_kwargs(generator_refit_kwargs, graph_refit_kwargs)
        self.train_params_ = {
            "max_epochs": max_epochs,
            "split_key": split_key,
            "train_split": train_split,
            "validation_split": validation_split,
            "batch_size": batch_size,
            "lr": lr,
            "early_stopping": early_stopping,
            "graph_threshold": graph_threshold,
            "kl_warmup_fraction": kl_warmup_fraction,
            "generator_refit_steps": generator_refit_steps,
            "graph_refit": graph_refit,
            "neighbour_selection": neighbour_selection,
            **{k: v for k, v in (plan_kwargs or {}).items() if isinstance(v, str | int | float)},
        }
        train_idx, val_idx, test_idx = self._split_indices(
            split_key, train_split, validation_split
        )
        self._set_training_statistics(train_idx)
        self.module.ensemble_fitted.fill_(False)  # the joint stage trains the joint generator
        self.module.neighbour_weight.zero_()  # chosen again after the second stage
        self.neighbour_selection_ = None
        self.ensemble_selection_ = None
        default_epochs = int(np.clip(2e6 / max(len(train_idx), 1), 20, 400))
        if checkpoint_dir is not None:
            max_epochs = prepare_checkpointing(
                checkpoint_dir,
                split_fingerprint([train_idx, val_idx, test_idx], self.adata.n_obs),
                max_epochs,
                default_epochs,
                trainer_kwargs,
            )
        if max_epochs is None:
            max_epochs = default_epochs
        self.train_params_["max_epochs"] = max_epochs
        plan_kwargs = {
            "lr": lr,
            "n_epochs_kl_warmup": max(1, round(kl_warmup_fraction * max_epochs)),
            **(plan_kwargs or {}),
        }
        datasplitter_kwargs = {
            **(datasplitter_kwargs or {}),
            "external_indexing": [train_idx, val_idx, test_idx],
        }
        if early_stopping and len(val_idx) == 0:
            raise ValueError("early_stopping needs validation cells: pass `validation_split`.")
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "elbo_validation")
        # validate every epoch when there is a validation set, never otherwise (scvi-tools
        # would switch validation on for checkpointing even without validation cells)
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1 if len(val_idx) else sys.maxsize)
        try:
            result = super().train(
                max_epochs=max_epochs,
                batch_size=batch_size,
                early_stopping=early_stopping,
                plan_kwargs=plan_kwargs,
                datasplitter_kwargs=datasplitter_kwargs,
                **trainer_kwargs,
            )
        except (KeyboardInterrupt, SystemExit):
            logger.warning(
                "Training was interrupted; the model keeps the weights reached so far and can "
                "be used, saved, or trained further (with `checkpoint_dir=`, call `train` "
                "again with the same folder to resume)."
            )
            self.is_trained_ = True
            self._finish_training(graph_threshold)
            raise
        refit = generator_refit_steps > 0
        new_graph = refit and graph_refit and self.module.scm.graph == "dag"
        self._finish_training(graph_threshold, warn_cycles=not new_graph)
        if refit:
            graph = (graph_refit_kwargs or {}) | {"threshold": graph_threshold}
            self._refit_generator(
                train_idx,
                generator_refit_steps,
                generator_refit_kwargs,
                graph if new_graph else None,
            )
        if refit and neighbour_selection and self._has_unseen_validation():
            scorer = validation_scorer(self)  # the same validation cells for both choices
            self._keep_ensemble_selection(select_ensemble_members(self, scorer=scorer))
            self._keep_neighbour_selection(select_neighbour_mixture(self, scorer=scorer))
        return result

    def _has_unseen_validation(self) -> bool:
        """Whether the validation cells include perturbations unseen in training."""
        params = self.train_params_
        if params.get("validation_split") is None or self.module.generator is None:
            return False
        cells = unseen_validation_cells(
            self, self.adata, params["split_key"], params["validation_split"]
        )
        return len(cells) > 0

    def select_ensemble_members(
        self,
        adata: AnnData | None = None,
        split_key: str | None = None,
        validation_split: str | None = None,
        n_cells: int = 200,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Choose which kind of ensemble member predicts unseen perturbations.

        The ensemble holds ``n_generators`` members of each kind (``ensemble_layers``:
        low-rank linear maps and one-layer MLPs by default, all on the features' principal
        components; :class:`~gim_scvi.module.GeneratorEnsemble`). A linear map extrapolates
        a smooth feature-to-mechanism map; an MLP also captures mechanisms that are
        non-linear in a few feature directions, and needs more training perturbations.
        Which predicts unseen drugs better depends on the screen (``benchmarks/README.md``),
        so each kind alone and all members together predict the validation perturbations
        (never trained on), with the neighbour mixture off, and the candidate with the
        highest mean DEG-R² at their highest dose is kept (as in
        :meth:`select_neighbour_mixture`, DEGs pooled over doses). :meth:`train` does this,
        before choosing the neighbour mixture, when its ``validation_split`` holds such
        perturbations; until then every member acts.

        Parameters
        ----------
        adata
            Registered AnnData with the validation cells (default: the model's).
        split_key
            Column of ``adata.obs`` with the split (default: the one used in :meth:`train`).
        validation_split
            Value marking the validation cells (default: the one used in :meth:`train`).
        n_cells
            Predicted cells per validation condition.
        seed
            Seed of the predicted cells.

        Returns
        -------
        One row per candidate (``member_layers``: hidden layers of the members that act,
        e.g. ``"0"``, ``"1"``, ``"0+1"``) with its mean ``r2_deg``, ``pearson_delta_deg``
        and ``energy_distance`` on the validation conditions at their highest dose, ``gap``
        and ``gap_se`` (shortfall to the best and its standard error over the validation
        perturbations); ``chosen`` marks the one kept. Also stored as
        ``ensemble_selection_``.
        """
        table = select_ensemble_members(self, adata, split_key, validation_split, n_cells, seed)
        self._keep_ensemble_selection(table)
        return table

    def _keep_ensemble_selection(self, table: pd.DataFrame) -> None:
        self.ensemble_selection_ = table
        self.train_params_["ensemble_member_layers"] = list(self.module.generator.active_kinds)

    def select_neighbour_mixture(
        self,
        adata: AnnData | None = None,
        split_key: str | None = None,
        validation_split: str | None = None,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
        n_cells: int = 200,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Choose how much unseen perturbations borrow from similar seen ones.

        An unseen perturbation's intervention distribution is ``w`` x the mixture of the
        seen perturbations' own interventions (their targets, shift sizes and dose response
        in the same cell line), weighted by ``softmax(similarity / temperature)`` (Tanimoto
        on binary features such as Morgan bits; otherwise minus the Euclidean distance of
        standardised features in units of the median one), plus ``1 - w`` x the generator
        ensemble's (:meth:`~gim_scvi.module.GIMModule.neighbour_intervention`). Both parts
        are mixtures of sparse interventions, so a draw still targets a few programs. The
        ensemble extrapolates a smooth feature-to-mechanism map; the neighbours win where
        similar drugs act alike in ways the features do not capture smoothly. Which holds
        depends on the screen, and cross-validation over the training perturbations cannot
        tell (they shaped the programs; ``benchmarks/README.md``), so the choice is made on
        validation perturbations that were never trained on: each
        (``weight``, ``temperature``) pair predicts them and is scored by its mean DEG-R² at
        their highest dose (:func:`gim_scvi.tl.evaluate`, DEGs pooled over doses), and the
        smallest weight within one standard error of the best (paired, over the validation
        perturbations: each one's conditions averaged, as its cell lines share its
        intervention) is kept, so that a few validation drugs move the model away from the
        ensemble only on clear evidence. :meth:`train` does this when its
        ``validation_split`` holds such perturbations, after choosing the ensemble's members
        (:meth:`select_ensemble_members`). The scores use the control and
        validation cells (and 2,000 training cells for the energy distance's principal
        components), so the cost does not grow with the training set.

        Parameters
        ----------
        adata
            Registered AnnData with the validation cells (default: the model's).
        split_key
            Column of ``adata.obs`` with the split (default: the one used in :meth:`train`).
        validation_split
            Value marking the validation cells (default: the one used in :meth:`train`).
        weights
            Weights ``w`` of the neighbours to try; must include 0.
        temperatures
            Softmax temperatures to try (for each weight above 0).
        n_cells
            Predicted cells per validation condition.
        seed
            Seed of the predicted cells.

        Returns
        -------
        One row per candidate with its mean ``r2_deg``, ``pearson_delta_deg`` and
        ``energy_distance`` on the validation conditions at their highest dose, ``gap`` (mean
        shortfall in ``r2_deg`` to the best candidate) and ``gap_se`` (its standard error
        over the validation perturbations);
        ``chosen`` marks the one kept. Also stored as ``neighbour_selection_``.
        """
        table = select_neighbour_mixture(
            self, adata, split_key, validation_split, weights, temperatures, n_cells, seed
        )
        self._keep_neighbour_selection(table)
        return table

    def _keep_neighbour_selection(self, table: pd.DataFrame) -> None:
        self.neighbour_selection_ = table
        self.train_params_["neighbour_weight"] = float(self.module.neighbour_weight)
        self.train_params_["neighbour_temperature"] = float(self.module.neighbour_temperature)

    def _refit_generator(
        self,
        train_idx: np.ndarray,
        n_steps: int,
        kwargs: dict | None,
        graph_kwargs: dict | None = None,
    ) -> None:
        """Second training stage on the final latents.

        With ``graph_kwargs``, the graph is refitted first (:func:`refit_graph`). Then every
        generator member is fitted afresh (unseen perturbations), and each training
        perturbation's shift sizes and dose response on its own cells (seen ones).
        """
        kwargs = dict(kwargs or {})
        encoded = encode_cells(self, train_idx)  # the same latents serve both graphs
        contexts = context_residuals(self, train_idx, encoded=encoded)
        if graph_kwargs is not None:
            graph = refit_graph(self.module, contexts, **graph_kwargs)
            self.graph_pruning_ = {k: v for k, v in graph.items() if k != "edges"}
            self.train_params_["graph_refit_edges"] = graph["edges"]
            logger.info(
                "Causal graph refitted on %d training conditions: %d edges (%d weak ones "
                "pruned, %d removed to break cycles).",
                len(contexts.n_cells),
                graph["edges"],
                graph["removed_small"],
                graph["removed_on_cycles"],
            )
            contexts = context_residuals(self, train_idx, encoded=encoded)  # under the new graph
        with torch.no_grad():  # re-estimated from the controls under the final graph
            module = self.module
            module.basal_mean.weight.copy_(torch.as_tensor(contexts.basal_mean))
            module.log_exogenous_scale.copy_(torch.log(torch.as_tensor(contexts.exogenous_sd)))
        seed = scvi.settings.seed or 0
        seen_loss = refit_seen_perturbations(self.module, contexts, seed=seed)
        self.train_params_["seen_refit_loss"] = round(seen_loss, 4)
        logger.info(
            "Shift sizes and dose response of each training perturbation fitted on its %d "
            "training conditions (final loss %.3f).",
            len(contexts.n_cells),
            seen_loss,
        )
        if self.module.generator is None:
            return
        losses = refit_generator(self.module, contexts, n_steps=n_steps, seed=seed, **kwargs)
        self.train_params_["generator_refit_loss"] = [round(v, 4) for v in losses]
        logger.info(
            "Generator refit on %d training conditions: %d member(s), final loss %s.",
            len(contexts.n_cells),
            len(losses),
            ", ".join(f"{v:.3f}" for v in losses),
        )

    def _finish_training(self, graph_threshold: float, warn_cycles: bool = True) -> None:
        """Evaluation mode and, for a DAG, the exact acyclic projection.

        ``warn_cycles=False`` when the graph is refitted next (its cycles do not matter then).
        """
        self.module.eval()
        if self.module.scm.graph == "dag":
            self.graph_pruning_ = self.module.scm.make_acyclic(
                threshold=graph_threshold, warn=warn_cycles
            )

    def _split_indices(
        self, split_key: str | None, train_split: str, validation_split: str | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_obs = self.adata.n_obs
        if split_key is None:
            return np.arange(n_obs), np.array([], dtype=int), np.array([], dtype=int)
        check.check_obs_key(self.adata, split_key, "split_key")
        split = self.adata.obs[split_key].astype(str).to_numpy()
        values = sorted(set(split))
        if train_split not in values:
            raise ValueError(
                f"No cell has adata.obs[{split_key!r}] == {train_split!r} (values: {values}); "
                "set `train_split` to the value that marks training cells."
            )
        if validation_split is not None and validation_split not in values:
            raise ValueError(
                f"No cell has adata.obs[{split_key!r}] == {validation_split!r} "
                f"(values: {values}); set `validation_split` accordingly or to None."
            )
        train = np.flatnonzero(split == train_split)
        val = np.flatnonzero(split == validation_split) if validation_split else np.array([], int)
        test = np.flatnonzero(
            (split != train_split) & (split != (validation_split or train_split))
        )
        return train, val, test

    def _set_training_statistics(self, train_idx: np.ndarray) -> None:
        """Feature/dose standardisation and cells per context, from training cells only."""
        adata = self.adata
        features = self._features(adata)
        in_train = np.zeros(adata.n_obs, dtype=bool)
        in_train[train_idx] = True
        control = self._control_mask(adata, features)
        treated = in_train & ~control
        if not treated.any():
            raise ValueError("The training cells contain no perturbed cell; nothing to learn.")
        if not (in_train & control).any():
            raise ValueError(
                "The training cells contain no control cell. GIM learns each cell line's basal "
                "state from its controls: flag vehicle cells with `control_key` or give them "
                "all-zero feature rows."
            )
        codes = self._cell_line_codes(adata)
        lines_without = sorted(set(codes[treated]) - set(codes[in_train & control]))
        if lines_without:
            logger.warning(
                "Cell line(s) %s have no control cells in training; predictions in them need "
                "control cells passed to `predict(adata=...)`.",
                [self.cell_lines[c] for c in lines_without],
            )
        module = self.module
        mean, std = features.treated_mean_std(treated)
        module.feature_mean.copy_(torch.as_tensor(mean))
        # features constant in training (e.g. fingerprint bits never set) are not rescaled,
        # so a new drug that sets such a bit does not get a huge standardised input
        scale = np.where(std > 1e-6, std, 1.0)
        seen = features.unique[np.unique(features.inverse[treated])]
        if self.binary_features == "center":  # fingerprint bits keep their 0/1 scale
            scale[((seen == 0) | (seen == 1)).all(axis=0)] = 1.0
        module.feature_std.copy_(torch.as_tensor(scale))
        module.set_seen_features(torch.as_tensor(seen, dtype=torch.float32))
        if module.feature_projection is not None:
            module.set_feature_projection(torch.as_tensor((seen - mean) / scale))
        doses = self._doses(adata)
        context = [features.inverse[treated], codes[treated]]
        if doses is not None:
            log_dose = np.log(doses[treated])
            module.log_dose_center.fill_(float(log_dose.mean()))
            module.log_dose_scale.fill_(float(max(log_dose.std(), 1e-3)))
            context.append(doses[treated])
        log_lib = self._library(adata, train_idx)
        for code in np.unique(codes[train_idx]):
            module.log_library_mean[code] = float(log_lib[codes[train_idx] == code].mean())
            module.log_library_sd[code] = float(log_lib[codes[train_idx] == code].std())
        n_contexts = len(pd.DataFrame(dict(enumerate(context))).drop_duplicates())
        module.cells_per_context.fill_(treated.sum() / n_contexts)

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, **kwargs) -> None:
        """Save the model atomically (written to a temporary folder, then renamed).

        Parameters
        ----------
        dir_path
            Folder to write.
        overwrite
            Replace an existing folder; otherwise an existing ``dir_path`` is an error.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.save` (``save_anndata``, ...).
        """
        target = Path(dir_path)
        if target.exists() and not overwrite:
            raise FileExistsError(
                f"{target} already exists; pass `overwrite=True` to replace it or choose "
                "another folder."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        self.gim_version_ = _package_version()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save(str(tmp), overwrite=True, **kwargs)
            if target.exists():
                backup = target.with_name(f".{target.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                target.rename(backup)
                tmp.rename(target)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None, **kwargs):
        """Load a saved model; a failure names the gim_scvi version that saved it.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData to attach (set up like the training data), ``None`` to load the one saved
            with the model, or ``False`` to load without data.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.
        """
        try:
            return super().load(str(dir_path), adata=adata, **kwargs)
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            saved = _saved_version(Path(dir_path))
            if saved != _package_version():
                raise RuntimeError(
                    f"{dir_path} was saved by gim_scvi {saved}; this is gim_scvi "
                    f"{_package_version()} and cannot read it ({err}). Load it with gim_scvi "
                    f"{saved}, or retrain."
                ) from err
            raise

    # ------------------------------------------------------------------ inference helpers
    @torch.inference_mode()
    def _encode(self, adata: AnnData, indices: np.ndarray, batch_size: int) -> np.ndarray:
        """Posterior means of the programs for ``indices`` of a registered AnnData."""
        return self.get_latent_representation(adata, indices=indices, batch_size=batch_size)

    def _library(self, adata: AnnData, indices: np.ndarray) -> np.ndarray:
        layer = self._setup_arg("layer")
        x = adata.layers[layer] if layer is not None else adata.X
        chunk = 50_000  # row sums chunk by chunk: no copy of the whole matrix
        sums = np.concatenate(
            [np.zeros(0)]
            + [
                np.asarray(x[indices[i : i + chunk]].sum(axis=1)).reshape(-1)
                for i in range(0, len(indices), chunk)
            ]
        )
        return np.log(np.maximum(sums, 1.0)).astype(np.float32)

    @torch.inference_mode()
    def _intervention_tensors(
        self,
        features: np.ndarray,
        doses: np.ndarray | None,
        cell_line: np.ndarray,
        mode: str,
        generator: torch.Generator | None = None,
        no_effect_targets: Literal["features", "cells"] = "cells",
    ) -> dict[str, torch.Tensor | None]:
        """Composed interventions for rows of ``(n, m, P)`` features and ``(n, m)`` doses.

        Shifts (and scale changes) of the ``m`` components add up; target probabilities
        combine as a union ``1 - prod(1 - p)``. All-zero component rows are ignored. With
        ``no_effect_targets="features"``, a training perturbation whose fit to its own cells
        has no target (see :meth:`get_intervention_targets`) takes the feature-based target
        probabilities; ``"from_features"`` marks those components.
        """
        n, m, p = features.shape
        device = self.module.device
        flat_feat = torch.as_tensor(features.reshape(n * m, p), device=device)
        flat_line = torch.as_tensor(np.repeat(cell_line, m)[:, None], device=device)
        flat_dose = None
        if doses is not None:
            flat_dose = torch.as_tensor(
                doses.reshape(n * m, 1), dtype=torch.float32, device=device
            )
        out = self.module.intervention(
            flat_feat, flat_dose, flat_line, mode=mode, generator=generator
        )
        active = torch.as_tensor(~zero_rows(features.reshape(n * m, p)), device=device).float()[
            :, None
        ]
        flat_probs = out["target_probs"]
        from_features = torch.zeros(n * m, dtype=torch.bool, device=device)
        if no_effect_targets == "features":
            from_features = self.module.seen_rows(flat_feat) & (flat_probs <= 0.5).all(1)
            if from_features.any():
                by_features = self.module.intervention(
                    flat_feat, flat_dose, flat_line, mode="mean", use_seen=False
                )["target_probs"]
                flat_probs = torch.where(from_features[:, None], by_features, flat_probs)
        elif no_effect_targets != "cells":
            raise ValueError(
                f"no_effect must be 'features' or 'cells', got {no_effect_targets!r}."
            )

        def compose(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t * active).view(n, m, -1).sum(1)

        probs = (flat_probs * active).view(n, m, -1)
        return {
            "shift": compose(out["shift"]),
            "log_scale": compose(out["log_scale"]),
            "target_probs": 1 - torch.prod(1 - probs, dim=1),
            "dose_response": compose(out["dose_response"] * out["targets"]),
            "from_features": (from_features & active[:, 0].bool()).view(n, m),
        }

    # ------------------------------------------------------------------ prediction
    @torch.inference_mode()
    def predict(
        self,
        features: np.ndarray | Sequence,
        doses: float | Sequence | np.ndarray | None = None,
        cell_lines: str | Sequence[str] | None = None,
        conditions: Sequence[str] | None = None,
        adata: AnnData | None = None,
        n_cells: int | None = 200,
        mode: Literal["map", "mean", "sample"] = "mean",
        sample_counts: bool = True,
        seed: int = 0,
        batch_size: int = 1024,
    ) -> AnnData:
        """Predict cells under perturbations, including ones never seen in training.

        Each requested condition is applied, in each requested cell line, to control cells of
        that line: their programs are encoded, the exogenous state is abducted, the generated
        intervention is applied and propagated through the causal graph, and the result is
        decoded with the control cell's library size.

        Parameters
        ----------
        features
            Perturbation features, ``(n_conditions, P)`` for single perturbations or
            ``(n_conditions, n_components, P)`` for combinations (all-zero component rows are
            padding). Compute them the same way as for training.
        doses
            A scalar, ``(n_conditions,)`` or ``(n_conditions, n_components)``; required when
            the model was set up with a ``dose_key``.
        cell_lines
            Cell line(s) to predict in; every condition is predicted in every listed line.
            Default: all registered lines.
        conditions
            Names of the conditions (default ``"perturbation_<i>"``).
        adata
            Registered AnnData providing the control cells (default: the training AnnData).
            Without any (a model loaded with ``adata=False``), basal cells are drawn from the
            learned exogenous prior with library sizes like the training cells'.
        n_cells
            Control cells drawn per condition and line (with replacement if the line has fewer);
            ``None`` uses every control cell once.
        mode
            ``"mean"`` (the expected intervention: targets weighted by their probability ``p``;
            the default, the best point prediction in our measurements), ``"map"`` (only
            targets with ``p > 0.5``; an unseen perturbation whose targets are all uncertain
            then has no effect at all) or ``"sample"`` (one draw of the targets per predicted
            cell: predictive uncertainty).
        sample_counts
            Put counts drawn from the likelihood in ``.X`` (realistic cells, the default);
            otherwise ``.X`` holds the expected values. Expected values are always in
            ``.layers["expected"]``.
        seed
            Seed for choosing control cells and for the draws.
        batch_size
            Cells processed at a time.

        Returns
        -------
        AnnData
            Predicted cells: ``.obs`` has ``condition``, ``dose``, ``cell_line``,
            ``source_cell`` (the control cell it was derived from) and ``mode``;
            ``.obsm["X_gim"]`` the counterfactual programs; ``.uns["gim_predict"]`` the
            targets.
        """
        plan = self._prediction_plan(
            features,
            doses,
            cell_lines,
            conditions,
            adata,
            n_cells,
            mode,
            sample_counts,
            seed,
            batch_size,
        )
        return self._predict_conditions(plan, np.arange(len(plan["names"])))

    def predict_iter(
        self,
        features: np.ndarray | Sequence,
        doses: float | Sequence | np.ndarray | None = None,
        cell_lines: str | Sequence[str] | None = None,
        conditions: Sequence[str] | None = None,
        adata: AnnData | None = None,
        n_cells: int | None = 200,
        mode: Literal["map", "mean", "sample"] = "mean",
        sample_counts: bool = True,
        seed: int = 0,
        batch_size: int = 1024,
        conditions_per_chunk: int = 32,
    ) -> Iterator[AnnData]:
        """:meth:`predict` in chunks of conditions, for screens too large to hold at once.

        Yields one AnnData per ``conditions_per_chunk`` conditions (in every requested cell
        line); memory does not grow with the number of conditions. The control cells are
        encoded once. A condition's cells are the same as from :meth:`predict` with the same
        arguments and seed, whatever the chunking (same control cells and random draws; the
        expected values agree up to floating-point rounding). Write each chunk to disk, or
        reduce it (e.g. to condition means) before asking for the next.

        Parameters
        ----------
        features, doses, cell_lines, conditions, adata, n_cells, mode, sample_counts, seed, \
batch_size
            As for :meth:`predict`.
        conditions_per_chunk
            Conditions per yielded AnnData.
        """
        plan = self._prediction_plan(
            features,
            doses,
            cell_lines,
            conditions,
            adata,
            n_cells,
            mode,
            sample_counts,
            seed,
            batch_size,
        )
        n_cond = len(plan["names"])
        for start in range(0, n_cond, max(int(conditions_per_chunk), 1)):
            stop = min(start + max(int(conditions_per_chunk), 1), n_cond)
            yield self._predict_conditions(plan, np.arange(start, stop))

    @torch.inference_mode()
    def _prediction_plan(
        self,
        features,
        doses,
        cell_lines,
        conditions,
        adata,
        n_cells,
        mode,
        sample_counts,
        seed,
        batch_size,
    ) -> dict:
        """Validated inputs and the encoded control cells of every requested line."""
        self._check_if_trained(warn=True)
        if mode not in ("map", "mean", "sample"):
            raise ValueError(f"mode must be 'map', 'mean' or 'sample', got {mode!r}.")
        if n_cells is not None and (
            isinstance(n_cells, bool) or int(n_cells) != n_cells or n_cells < 1
        ):
            raise ValueError(
                f"n_cells must be a positive whole number of cells per condition and line, or "
                f"None (every control cell of the line), got {n_cells!r}."
            )
        features3d = self._validate_predict_features(features)
        n_cond, n_comp = features3d.shape[:2]
        dose2d = self._validate_predict_doses(doses, n_cond, n_comp)
        names = _condition_names(conditions, n_cond)
        lines = self._validate_cell_lines(cell_lines)
        adata = adata if adata is not None else self.adata
        adata = self._validate_anndata(self.align_genes(adata)) if adata is not None else None
        cells = None
        if adata is not None:  # each cell's line if it is a control (-1 otherwise), and batch
            control_line = np.where(self._control_mask(adata), self._cell_line_codes(adata), -1)
            cells = (control_line, self._batch_codes(adata))
        pools = {}
        for j, line in enumerate(lines):
            generator = torch.Generator(device=self.module.device)
            generator.manual_seed(_derived_seed(seed, j))
            pools[line] = self._control_pool(adata, cells, line, n_cells, generator, batch_size)
        return {
            "features": features3d,
            "doses": dose2d,
            "names": names,
            "lines": lines,
            "pools": pools,
            "n_cells": n_cells,
            "mode": mode,
            "sample_counts": sample_counts,
            "seed": seed,
            "batch_size": batch_size,
            "var_names": adata.var_names if adata is not None else self._var_names(),
        }

    @torch.inference_mode()
    def _predict_conditions(self, plan: dict, which: np.ndarray) -> AnnData:
        """Predicted cells of the conditions ``which`` of a :meth:`_prediction_plan`."""
        blocks = []
        dose2d = plan["doses"]
        mode = plan["mode"]
        device = self.module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for j, line in enumerate(plan["lines"]):
                pool = plan["pools"][line]
                code = self.cell_lines.index(line)
                shared = None
                if mode != "sample":  # one intervention per condition: all at once
                    shared = self._intervention_tensors(
                        plan["features"][which],
                        None if dose2d is None else dose2d[which],
                        np.full(len(which), code),
                        mode,
                    )
                for k, i in enumerate(which):
                    # each (condition, line) has its own random stream: chunking changes nothing
                    block_seed = _derived_seed(plan["seed"], j, int(i))
                    rng = np.random.default_rng(block_seed)
                    pick = _choose(len(pool["source"]), plan["n_cells"], rng)
                    if shared is None:
                        shift, log_scale = self._sampled_interventions(
                            plan["features"][i],
                            None if dose2d is None else dose2d[i],
                            code,
                            len(pick),
                            torch.Generator(device=device).manual_seed(block_seed),
                        )
                    else:
                        shift = shared["shift"][k : k + 1].expand(len(pick), -1)
                        log_scale = shared["log_scale"]
                        if log_scale is not None:
                            log_scale = log_scale[k : k + 1].expand(len(pick), -1)
                    block = {
                        "condition": np.full(len(pick), int(i)),
                        "line": np.full(len(pick), j),
                        "source": pool["source"][pick],
                        "inputs": (shift, log_scale, code, pick),
                    }
                    if plan["sample_counts"]:  # the draws need the block's own random stream
                        torch.manual_seed(block_seed)  # the likelihood samples from it
                        block |= self._predict_block(
                            shift,
                            log_scale,
                            code,
                            pool["z"][pick],
                            pool["library"][pick],
                            pool["batch"][pick],
                            True,
                        )
                    blocks.append(block)
                if not plan["sample_counts"]:  # deterministic: decode the line's cells at once
                    self._decode_together([b for b in blocks if "X" not in b], pool, plan)
        return self._assemble_prediction(blocks, plan, which)

    def _decode_together(self, blocks: list[dict], pool: dict, plan: dict) -> None:
        """Expected values of several blocks of one line, ``batch_size`` cells per pass."""
        shift = torch.cat([b["inputs"][0] for b in blocks])
        scales = [b["inputs"][1] for b in blocks]
        log_scale = None if scales[0] is None else torch.cat(scales)
        pick = np.concatenate([b["inputs"][3] for b in blocks])
        code = blocks[0]["inputs"][2]
        step = max(int(plan["batch_size"]), 1)
        parts = [
            self._predict_block(
                shift[s : s + step],
                None if log_scale is None else log_scale[s : s + step],
                code,
                pool["z"][pick[s : s + step]],
                pool["library"][pick[s : s + step]],
                pool["batch"][pick[s : s + step]],
                False,
            )
            for s in range(0, len(pick), step)
        ]
        expected = np.concatenate([p["expected"] for p in parts])
        latent = np.concatenate([p["latent"] for p in parts])
        bounds = np.cumsum([0] + [len(b["source"]) for b in blocks])
        for b, lo, hi in zip(blocks, bounds[:-1], bounds[1:], strict=True):
            b["X"] = b["expected"] = expected[lo:hi]
            b["latent"] = latent[lo:hi]

    def _sampled_interventions(self, features, doses, line_code, n, generator):
        """One draw of the intervention for each of ``n`` cells (``mode="sample"``)."""
        feats = np.broadcast_to(features, (n, *features.shape)).copy()
        dose = None if doses is None else np.broadcast_to(doses, (n, len(doses))).copy()
        interv = self._intervention_tensors(
            feats, dose, np.full(n, line_code), "sample", generator
        )
        return interv["shift"], interv["log_scale"]

    def _control_pool(
        self,
        adata: AnnData | None,
        cells: tuple[np.ndarray, np.ndarray] | None,
        line: str,
        n_cells: int | None,
        generator: torch.Generator,
        batch_size: int,
    ) -> dict[str, np.ndarray]:
        """Basal programs, log library sizes, batches and names of the cells to perturb.

        From the control cells of ``line`` in ``adata`` (encoded; ``cells`` holds each cell's
        line if it is a control, else -1, and its batch), or, without an AnnData, drawn from the
        exogenous prior with library sizes from the training statistics.
        """
        code = self.cell_lines.index(line)
        if adata is not None:
            control_line, batch_codes = cells
            pool = np.flatnonzero(control_line == code)
            if pool.size == 0:
                raise ValueError(
                    f"No control cells of cell line {line!r} in the AnnData used for prediction; "
                    "pass an `adata` with control cells of that line."
                )
            return {
                "z": self._encode(adata, pool, batch_size),
                "library": self._library(adata, pool),
                "batch": batch_codes[pool],
                "source": np.asarray(adata.obs_names[pool], dtype=str),
            }
        n = n_cells if n_cells is not None else 200
        module = self.module
        lines_t = torch.full((n, 1), code, device=module.device)
        u = module.sample_exogenous(lines_t, generator=generator)
        noise = torch.randn(n, generator=generator, device=module.device)
        log_lib = module.log_library_mean[code] + module.log_library_sd[code] * noise
        return {
            "z": module.scm.solve(u).cpu().numpy(),
            "library": log_lib.cpu().numpy().astype(np.float32),
            "batch": np.zeros(n, dtype=np.int64),
            "source": np.array([f"prior_{line}_{j}" for j in range(n)]),
        }

    def _predict_block(
        self,
        shift: torch.Tensor,
        log_scale: torch.Tensor | None,
        line_code: int,
        z_control: np.ndarray,
        library: np.ndarray,
        batch_codes: np.ndarray,
        sample_counts: bool,
    ) -> dict:
        """Counterfactual programs and decoded expression of control cells under a shift."""
        n = z_control.shape[0]
        device = self.module.device
        line_t = torch.full((n, 1), line_code, device=device)
        z = torch.as_tensor(z_control, device=device)
        z_star = self.module.counterfactual(z, shift, log_scale, line_t)
        px = self.module.decoder(
            z_star,
            torch.as_tensor(library[:, None], device=device),
            line_t,
            torch.as_tensor(batch_codes[:, None], device=device),
        )
        expected = px.mean.cpu().numpy().astype(np.float32)
        x = expected
        if sample_counts:
            x = px.sample().cpu().numpy().astype(np.float32)
            if self.module.gene_likelihood != "normal":
                x = sp.csr_matrix(x)  # counts are mostly zero: keep each block sparse at once
        return {"X": x, "expected": expected, "latent": z_star.cpu().numpy()}

    def _assemble_prediction(self, blocks: list[dict], plan: dict, which: np.ndarray) -> AnnData:
        if sp.issparse(blocks[0]["X"]):
            x = sp.vstack([b["X"] for b in blocks], format="csr")
        else:
            x = np.concatenate([b["X"] for b in blocks])
        condition = np.concatenate([b["condition"] for b in blocks])
        obs = pd.DataFrame(
            {
                "condition": np.asarray(plan["names"], dtype=object)[condition],
                "dose": _dose_labels(plan["doses"], len(plan["names"]))[condition],
                "cell_line": np.asarray(plan["lines"], dtype=object)[
                    np.concatenate([b["line"] for b in blocks])
                ],
                "source_cell": np.concatenate([b["source"] for b in blocks]).astype(str),
                "mode": plan["mode"],
            }
        )
        obs.index = pd.Index([f"pred_{i}" for i in range(len(obs))])
        var = pd.DataFrame(index=pd.Index(plan["var_names"]).astype(str))
        pred = AnnData(X=x, obs=obs, var=var)
        for col in ("condition", "cell_line", "mode"):
            pred.obs[col] = pd.Categorical(pred.obs[col])
        if plan["sample_counts"]:
            pred.layers["expected"] = np.concatenate([b["expected"] for b in blocks])
        else:  # X holds the expected values too; a copy, so that normalising X leaves it
            pred.layers["expected"] = x.copy()
        pred.obsm["X_gim"] = np.concatenate([b["latent"] for b in blocks])
        dose2d = plan["doses"]
        targets = self.get_intervention_targets(
            features=plan["features"][which],
            doses=None if dose2d is None else dose2d[which],
            cell_lines=plan["lines"],
            conditions=[plan["names"][i] for i in which],
        )
        pred.uns["gim_predict"] = {"mode": plan["mode"], "targets": _flatten_index(targets)}
        return pred

    def _validate_predict_features(self, features) -> np.ndarray:
        arr = np.asarray(features, dtype=np.float32)
        n_feat = int(self.module.feature_mean.shape[0])
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[-1] != n_feat:
            raise ValueError(
                f"`features` must have shape (n_conditions, {n_feat}) or (n_conditions, "
                f"n_components, {n_feat}) like adata.obsm[{self._setup_arg('features_key')!r}] "
                f"at training; got shape {np.shape(features)}. Compute the features with the "
                "same featuriser and settings."
            )
        if not np.isfinite(arr).all():
            raise ValueError("`features` contains NaN or infinite values.")
        return arr

    def _validate_predict_doses(self, doses, n_cond: int, n_comp: int) -> np.ndarray | None:
        if not self.module.has_dose:
            if doses is not None:
                raise ValueError(
                    "This model was set up without `dose_key`; do not pass `doses` to predict."
                )
            return None
        if doses is None:
            raise ValueError(
                f"This model was set up with dose_key={self._setup_arg('dose_key')!r}: pass "
                "`doses` (a scalar, one per condition, or one per condition and component)."
            )
        arr = np.asarray(doses, dtype=np.float32)
        if arr.ndim == 0:
            arr = np.full((n_cond, n_comp), float(arr), dtype=np.float32)
        elif arr.ndim == 1 and arr.shape[0] == n_cond:
            arr = np.repeat(arr[:, None], n_comp, axis=1)
        if arr.shape != (n_cond, n_comp):
            raise ValueError(
                f"`doses` must be a scalar, ({n_cond},) or ({n_cond}, {n_comp}); "
                f"got shape {np.shape(doses)}."
            )
        if not (np.isfinite(arr).all() and (arr > 0).all()):
            raise ValueError("`doses` must be finite and positive.")
        return arr

    def _validate_cell_lines(self, cell_lines) -> list[str]:
        if cell_lines is None:
            return self.cell_lines
        lines = [cell_lines] if isinstance(cell_lines, str) else [str(c) for c in cell_lines]
        unknown = [c for c in lines if c not in self.cell_lines]
        if unknown:
            raise ValueError(
                f"Unknown cell line(s) {unknown}; the model knows {self.cell_lines}. A new cell "
                "line needs its own control cells at training time."
            )
        return lines

    # ------------------------------------------------------------------ what the model learned
    def _registered_conditions(self, adata: AnnData | None) -> pd.DataFrame:
        """One row per perturbed (perturbation, dose, cell line) context in ``adata``.

        Column ``features`` holds each context's feature row (``row`` its first cell).
        """
        adata = adata if adata is not None else self.adata
        features = self._features(adata)
        treated = ~self._control_mask(adata, features)
        frame = pd.DataFrame(
            {
                "condition": self._perturbation_names(adata, features)[treated],
                "cell_line": np.asarray(self.cell_lines)[self._cell_line_codes(adata)[treated]],
                "row": np.flatnonzero(treated),
            }
        )
        doses = self._doses(adata)
        frame["dose"] = doses[treated] if doses is not None else np.nan
        frame = frame.drop_duplicates(["condition", "dose", "cell_line"]).reset_index(drop=True)
        frame["features"] = list(features[frame["row"].to_numpy()])
        return frame

    @torch.inference_mode()
    def get_intervention_targets(
        self,
        features: np.ndarray | None = None,
        doses: np.ndarray | None = None,
        cell_lines: str | Sequence[str] | None = None,
        conditions: Sequence[str] | None = None,
        adata: AnnData | None = None,
        no_effect: Literal["features", "cells"] = "features",
    ) -> pd.DataFrame:
        """Probability that each condition targets each program.

        Without ``features``, every perturbation of ``adata`` (default: the training AnnData)
        is reported in each cell line it was observed in. Target probabilities do not depend on
        the dose (the dose acts through the dose response).

        Parameters
        ----------
        features, doses, cell_lines, conditions
            Perturbations to report, as in :meth:`predict` (default: those of ``adata``).
        adata
            AnnData set up for the model (default: the training AnnData).
        no_effect
            Where a training perturbation's fit to its own cells has no target (no program
            with probability above 0.5 in that cell line: its cells showed no effect the model
            could attribute), its cells say nothing about *which* programs it would act on.
            ``"features"`` (default) reports the feature-based generator's probabilities
            there — what perturbations with similar features target, as for an unseen
            perturbation; ``"cells"`` keeps the fit to its own cells (probabilities near the
            sparse prior). Unseen perturbations and ones with an effect are not affected.

        Returns
        -------
        DataFrame
            Indexed by ``(condition, cell_line)``, one column per program.
        """
        if features is None:
            frame = self._registered_conditions(adata).drop_duplicates(["condition", "cell_line"])
            feats = np.stack(frame["features"].to_list())[:, None, :]
            codes = np.array([self.cell_lines.index(c) for c in frame["cell_line"]])
            index = pd.MultiIndex.from_arrays(
                [frame["condition"], frame["cell_line"]], names=["condition", "cell_line"]
            )
        else:
            feats = self._validate_predict_features(features)
            names = _condition_names(conditions, feats.shape[0])
            lines = self._validate_cell_lines(cell_lines)
            codes = np.repeat([self.cell_lines.index(c) for c in lines], feats.shape[0])
            feats = np.tile(feats, (len(lines), 1, 1))
            index = pd.MultiIndex.from_product([lines, names], names=["cell_line", "condition"])
            index = index.swaplevel()
        dose = np.ones(feats.shape[:2], np.float32) if self.module.has_dose else None
        probs = self._intervention_tensors(
            feats, dose, codes, "mean", no_effect_targets=no_effect
        )["target_probs"]
        return pd.DataFrame(probs.cpu().numpy(), index=index, columns=self.program_names)

    @torch.inference_mode()
    def get_interventions(
        self,
        adata: AnnData | None = None,
        mode: str = "mean",
        no_effect: Literal["features", "cells"] = "features",
    ) -> dict:
        """Shifts, total effects and targets of every perturbed context of ``adata``.

        ``mode`` is ``"mean"`` (expected shift, targets weighted by their probability) or
        ``"map"`` (targets with probability above 0.5). ``no_effect`` chooses the target
        probabilities of training perturbations without an effect, as in
        :meth:`get_intervention_targets`; shifts and total effects are always the fit.

        Returns
        -------
        dict
            DataFrames indexed like ``conditions`` (a DataFrame with ``condition``,
            ``dose``, ``cell_line`` and ``targets_from_features``, which marks the contexts
            whose target probabilities come from the features): ``targets``
            (probabilities), ``shifts`` (``a``) and ``total_effects`` (``a A^{-1}``, the
            change of every program).
        """
        frame = self._registered_conditions(adata)
        feats = np.stack(frame["features"].to_list())[:, None, :]
        codes = np.array([self.cell_lines.index(c) for c in frame["cell_line"]])
        dose = frame["dose"].to_numpy(np.float32)[:, None] if self.module.has_dose else None
        out = self._intervention_tensors(feats, dose, codes, mode, no_effect_targets=no_effect)
        total = self.module.scm.total_effects(out["shift"])
        doses = frame["dose"] if self.module.has_dose else None
        index = pd.Index(
            context_labels(frame["condition"], doses, frame["cell_line"]), name="context"
        )
        conditions = frame[["condition", "dose", "cell_line"]].set_index(index)
        conditions["targets_from_features"] = out["from_features"].any(1).cpu().numpy()
        return {
            "conditions": conditions,
            "targets": pd.DataFrame(
                out["target_probs"].cpu().numpy(), index=index, columns=self.program_names
            ),
            "shifts": pd.DataFrame(
                out["shift"].cpu().numpy(), index=index, columns=self.program_names
            ),
            "total_effects": pd.DataFrame(
                total.cpu().numpy(), index=index, columns=self.program_names
            ),
        }

    @torch.inference_mode()
    def get_causal_graph(self) -> pd.DataFrame:
        """Weighted adjacency of the program graph (row: cause, column: effect)."""
        w = self.module.scm.weight.detach().cpu().numpy()
        return pd.DataFrame(w, index=self.program_names, columns=self.program_names)

    @torch.inference_mode()
    def get_gene_programs(self) -> pd.DataFrame:
        """Gene loadings of each program (genes x programs).

        For the linear decoder these are its columns. For the MLP decoder they are the change
        of each gene's log-expression when one program rises by one unit from the average
        control cell (a finite-difference sensitivity).
        """
        var_names = self._var_names()
        decoder = self.module.decoder
        if decoder.decoder == "linear":
            values = decoder.loadings.detach().cpu().numpy()
        else:
            k = self.module.n_programs
            base = self.module.basal_mean.weight.mean(0, keepdim=True)
            z = torch.cat([base, base + torch.eye(k, device=base.device)])
            zeros = torch.zeros(k + 1, 1, dtype=torch.long, device=base.device)
            logits = decoder.logits(z, zeros, zeros)
            values = (logits[1:] - logits[:1]).T.cpu().numpy()
        return pd.DataFrame(values, index=var_names, columns=self.program_names)

    def _var_names(self) -> pd.Index:
        if self.adata is not None:
            return self.adata.var_names
        return pd.Index(
            self.registry_["field_registries"][KEYS.X_KEY]["state_registry"].get(
                "column_names", [f"gene_{i}" for i in range(self.summary_stats.n_vars)]
            )
        )

    def targets_to_adata(self, adata: AnnData | None = None, **kwargs) -> AnnData:
        """Target probabilities as an AnnData (obs: conditions, var: programs).

        Ready for ``sc.pl.matrixplot(t, var_names=t.var_names, groupby="condition")`` and
        friends. ``kwargs`` go to :meth:`get_intervention_targets`.
        """
        targets = self.get_intervention_targets(adata=adata, **kwargs)
        obs = targets.index.to_frame(index=False).astype(str)
        out = AnnData(
            X=targets.to_numpy(dtype=np.float32),
            obs=obs.set_index(pd.Index(_flatten_index(targets).index)),
            var=pd.DataFrame(index=targets.columns),
        )
        for col in out.obs.columns:
            out.obs[col] = pd.Categorical(out.obs[col])
        return out


# ---------------------------------------------------------------------- helpers
def _package_version() -> str:
    try:
        return importlib.metadata.version("gim_scvi")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def _saved_version(dir_path: Path) -> str:
    """The gim_scvi version recorded in a saved model folder ("unknown" if none)."""
    try:
        saved = torch.load(dir_path / "model.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, ValueError):
        return "unknown"
    return str(saved.get("attr_dict", {}).get("gim_version_", "unknown (before 0.1.0)"))


def _codes(values: pd.Series, mapping: list[str], what: str, key: str) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(mapping)}
    strings = values.astype(str).to_numpy()
    unknown = sorted(set(strings) - set(lookup))
    if unknown:
        raise ValueError(
            f"Unknown {what}(s) {unknown[:5]} in adata.obs[{key!r}]; the model was trained on "
            f"{mapping}."
        )
    return np.array([lookup[s] for s in strings], dtype=np.int64)


def _check_counts(adata: AnnData, layer: str | None) -> None:
    """Fail on a count likelihood for values that are not counts, sampled over all cells."""
    x = adata.layers[layer] if layer is not None else adata.X
    rows = first_non_count_rows(x)
    if rows is not None:
        where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
        _raise_not_counts(where, rows)


def _raise_not_counts(where: str, rows: slice) -> None:
    raise ValueError(
        f"{where} does not look like raw counts (negative or non-integer values in cells "
        f"{rows.start}-{rows.stop - 1}), but the gene likelihood is a count model. Pass "
        "`layer=` with raw counts to setup_anndata, or use `gene_likelihood='normal'` for "
        "log-normalised data."
    )


def _check_refit_kwargs(generator: dict | None, graph: dict | None) -> None:
    """Fail before training on unknown keyword arguments of the second stage."""
    unknown = set(generator or {}) - {"lr", "weight_decay", "temperature"}
    if unknown:
        raise TypeError(
            "generator_refit_kwargs takes 'lr', 'weight_decay' and 'temperature', not "
            f"{sorted(unknown)}."
        )
    unknown = set(graph or {}) - {"l1", "n_steps", "lr"}
    if unknown:
        raise TypeError(
            f"graph_refit_kwargs takes 'l1', 'n_steps' and 'lr', not {sorted(unknown)}."
        )


def _condition_names(conditions, n: int) -> list[str]:
    if conditions is None:
        return [f"perturbation_{i}" for i in range(n)]
    names = [str(c) for c in conditions]
    if len(names) != n:
        raise ValueError(f"`conditions` has {len(names)} names for {n} conditions.")
    return names


def _derived_seed(*ints: int) -> int:
    """A seed for one part of a computation, from the user's seed and the part's indices."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])


def _choose(n_pool: int, n_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if n_cells is None:
        return np.arange(n_pool)
    return rng.choice(n_pool, size=n_cells, replace=n_cells > n_pool)


def _dose_labels(dose2d: np.ndarray | None, n_conditions: int) -> np.ndarray:
    """Each condition's dose for ``obs["dose"]``: a number, ``"d1+d2"`` for combinations."""
    if dose2d is None:
        return np.full(n_conditions, np.nan)
    if dose2d.shape[1] == 1:
        return dose2d[:, 0].astype(float)
    return np.array(["+".join(f"{d:g}" for d in row) for row in dose2d], dtype=object)


def _flatten_index(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out.index = pd.Index([" | ".join(map(str, i)) for i in frame.index], name="context")
    return out
