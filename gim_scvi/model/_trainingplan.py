"""Training plan with the GIM schedules (relaxation temperature, acyclicity weight)."""

from __future__ import annotations

import math

import torch
from scvi.train import TrainingPlan


class GIMTrainingPlan(TrainingPlan):
    """:class:`~scvi.train.TrainingPlan` plus GIM's annealing schedules.

    The Gumbel-sigmoid temperature decays geometrically from ``temperature_start`` to
    ``temperature_end`` and the acyclicity weight grows geometrically from
    ``dag_weight_start`` to ``dag_weight_max`` over the planned epochs; both are functions of
    the training progress only, so a resumed run continues where it stopped. The generator
    gets its own weight decay (it sees few distinct perturbations and overfits easily), and
    the gene loadings of the linear decoder their own learning rate.

    Parameters
    ----------
    module
        A :class:`~gim_scvi.module.GIMModule`.
    temperature_start, temperature_end
        Relaxation temperature at the start and end of training.
    dag_weight_start, dag_weight_max
        Acyclicity penalty weight at the start and end of training.
    generator_weight_decay
        Weight decay of the intervention generator's parameters.
    loadings_lr_factor
        Learning rate of the linear decoder's gene loadings, as a multiple of ``lr`` (default
        10). Each loading gets a noisy minibatch gradient and a small share of the L1 prior,
        so at the common rate they hardly leave their starting value in a few thousand steps
        and the learned programs stay dense mixtures of the true ones
        (``benchmarks/README.md``, "Target recovery").
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module,
        *,
        temperature_start: float = 1.0,
        temperature_end: float = 0.2,
        dag_weight_start: float = 0.1,
        dag_weight_max: float = 1000.0,
        generator_weight_decay: float = 1e-3,
        loadings_lr_factor: float = 10.0,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        self.dag_weight_start = dag_weight_start
        self.dag_weight_max = dag_weight_max
        self.generator_weight_decay = generator_weight_decay
        if not loadings_lr_factor > 0:
            raise ValueError(f"loadings_lr_factor must be positive, got {loadings_lr_factor!r}.")
        self.loadings_lr_factor = loadings_lr_factor
        self.loss_kwargs.update({"dag_weight": dag_weight_start})

    @property
    def progress(self) -> float:
        """Fraction of the planned training done, in ``[0, 1]``."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.max_epochs:
            return 1.0
        n_batches = max(int(trainer.num_training_batches or 1), 1)
        done = self.current_epoch + self.global_step % n_batches / n_batches
        return min(done / trainer.max_epochs, 1.0)

    @staticmethod
    def _geometric(start: float, end: float, frac: float) -> float:
        return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))

    def current_temperature(self) -> float:
        """Relaxation temperature at the current progress."""
        return self._geometric(self.temperature_start, self.temperature_end, self.progress)

    def current_dag_weight(self) -> float:
        """Acyclicity weight at the current progress."""
        return self._geometric(self.dag_weight_start, self.dag_weight_max, self.progress)

    def training_step(self, batch, batch_idx):
        """Update the schedules, then the stock scvi-tools training step."""
        self.module.temperature = self.current_temperature()
        self.loss_kwargs.update({"dag_weight": self.current_dag_weight()})
        return super().training_step(batch, batch_idx)

    def compute_and_log_metrics(self, loss_output, metrics, mode):
        """Stock metric logging, run under ``no_grad`` instead of ``inference_mode``.

        scvi-tools logs under :func:`torch.inference_mode`; with a distributed strategy
        Lightning then synchronises the logged values in place outside inference mode, which
        fails ("Inplace update to inference tensor"). ``no_grad`` keeps the values ordinary
        tensors and changes nothing else.
        """
        log = TrainingPlan.compute_and_log_metrics
        log = getattr(log, "__wrapped__", log)
        with torch.no_grad():
            return log(self, loss_output, metrics, mode)

    def configure_optimizers(self):
        """Adam; the generator has its own weight decay, the loadings their own rate."""
        generators = [self.module.joint_generator, self.module.generator]
        generator_params = [
            p for net in generators if net is not None for p in net.parameters() if p.requires_grad
        ]
        loadings = getattr(self.module.decoder, "loadings_raw", None)
        loadings_params = [loadings] if loadings is not None and loadings.requires_grad else []
        special = {id(p) for p in generator_params + loadings_params}
        other_params = [
            p for p in self.module.parameters() if p.requires_grad and id(p) not in special
        ]
        groups = [
            {"params": other_params, "weight_decay": self.weight_decay},
            {"params": generator_params, "weight_decay": self.generator_weight_decay},
        ]
        if loadings_params:
            groups.append(
                {
                    "params": loadings_params,
                    "weight_decay": self.weight_decay,
                    "lr": self.lr * self.loadings_lr_factor,
                }
            )
        optimizer = torch.optim.Adam(groups, lr=self.lr, eps=self.eps)
        config = {"optimizer": optimizer}
        if self.reduce_lr_on_plateau:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                patience=self.lr_patience,
                factor=self.lr_factor,
                threshold=self.lr_threshold,
                min_lr=self.lr_min,
                threshold_mode="abs",
            )
            config["lr_scheduler"] = {"scheduler": scheduler, "monitor": self.lr_scheduler_metric}
        return config
