"""Checkpoint folders for resumable training."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from scvi.train import SaveCheckpoint

logger = logging.getLogger(__name__)

STATE_FILE = "gim_training.json"
LAST_CHECKPOINT = "last.ckpt"


def split_fingerprint(indices: list[np.ndarray], n_obs: int) -> dict:
    """Sizes and hashes of the train / validation / test indices."""
    out = {"n_obs": int(n_obs)}
    for name, idx in zip(("train", "validation", "test"), indices, strict=True):
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        out[name] = {"n": int(idx.size), "sha1": hashlib.sha1(idx.tobytes()).hexdigest()}
    return out


def prepare_checkpointing(
    checkpoint_dir: str | Path,
    split: dict,
    max_epochs: int | None,
    default_epochs: int,
    trainer_kwargs: dict,
) -> int:
    """Set up (or resume from) a checkpoint folder; returns the number of epochs to plan.

    A new folder records the split and the planned epochs next to Lightning's ``last.ckpt``
    (written after every epoch). A folder that already holds ``last.ckpt`` is resumed: the
    split must be the same (otherwise the schedules and the held-out guarantee would not
    hold) and the planned number of epochs is taken from the folder unless given.

    Parameters
    ----------
    checkpoint_dir
        Folder for the checkpoints.
    split
        :func:`split_fingerprint` of this run's split.
    max_epochs
        Planned epochs of this call (``None``: from the folder, or ``default_epochs``).
    default_epochs
        Planned epochs of a new run without ``max_epochs``.
    trainer_kwargs
        The trainer keyword arguments; updated in place (callback, ``ckpt_path``).
    """
    path = Path(checkpoint_dir)
    path.mkdir(parents=True, exist_ok=True)
    state_file = path / STATE_FILE
    last = path / LAST_CHECKPOINT
    if last.exists():
        if not state_file.exists():
            raise ValueError(
                f"{last} exists but {state_file} does not: the folder was not written by "
                "GIM.train(checkpoint_dir=...). Pass an empty folder or the folder of an "
                "interrupted GIM run."
            )
        saved = json.loads(state_file.read_text())
        if saved["split"] != split:
            raise ValueError(
                f"The checkpoint in {path} was trained on a different split (saved: "
                f"{_describe(saved['split'])}; now: {_describe(split)}). Resume with the same "
                "AnnData and split arguments, or pass a new `checkpoint_dir`."
            )
        if max_epochs is None:
            max_epochs = saved["max_epochs"]
        elif max_epochs != saved["max_epochs"]:
            logger.warning(
                "Resuming with max_epochs=%d, but the checkpoint planned %d; the annealing "
                "schedules follow the new plan from here on.",
                max_epochs,
                saved["max_epochs"],
            )
        logger.info("Resuming training from %s.", last)
        trainer_kwargs.setdefault("ckpt_path", str(last))
    if max_epochs is None:
        max_epochs = default_epochs
    state_file.write_text(json.dumps({"split": split, "max_epochs": max_epochs}, indent=1))
    callbacks = list(trainer_kwargs.get("callbacks") or [])
    # the latest state after every epoch, always under the same name
    callbacks.append(
        ModelCheckpoint(
            dirpath=path,
            filename="last",
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    )
    if not any(isinstance(c, SaveCheckpoint) for c in callbacks):
        callbacks.append(_NoModelCopies(dirpath=str(path), save_top_k=0))
    trainer_kwargs["callbacks"] = callbacks
    trainer_kwargs["enable_checkpointing"] = True
    trainer_kwargs.setdefault("default_root_dir", str(path))
    return max_epochs


class _NoModelCopies(SaveCheckpoint):
    """Stands in for the SaveCheckpoint that scvi-tools adds whenever checkpointing is on.

    scvi-tools' callback writes a full model folder under ``settings.logging_dir`` on every
    Lightning checkpoint; resuming needs only ``last.ckpt``.
    """

    def on_save_checkpoint(self, trainer, *args) -> None:
        """Write nothing."""


def _describe(split: dict) -> str:
    return ", ".join(f"{k} {v['n']}" for k, v in split.items() if isinstance(v, dict))
