"""Splits that hold out whole conditions."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from gim_scvi._utils import control_flags


def dose_holdout_split(
    adata: AnnData,
    dose: float,
    dose_key: str = "dose",
    control_key: str | None = "control",
    validation_dose: float | None = None,
    key_added: str = "split_dose",
) -> None:
    """Hold out one dose of every perturbation: ``adata.obs[key_added]``.

    Perturbed cells at ``dose`` are ``"test"`` (and at ``validation_dose``, ``"valid"``);
    every other cell, controls included, is ``"train"``. Train on this column to measure how
    well a model predicts a dose it never saw; compare with the ``"nearest_dose"`` baseline of
    :func:`gim_scvi.tl.evaluate`.

    Parameters
    ----------
    adata
        AnnData with a numeric dose per cell.
    dose
        The held-out dose (same unit as ``adata.obs[dose_key]``).
    dose_key
        Column of ``adata.obs`` with doses.
    control_key
        Optional boolean / 0-1 column flagging control cells (never held out).
    validation_dose
        Optionally a second dose for model selection.
    key_added
        Column of ``adata.obs`` to write.
    """
    if dose_key not in adata.obs:
        raise KeyError(f"`dose_key={dose_key!r}` is not a column of adata.obs.")
    doses = pd.to_numeric(adata.obs[dose_key], errors="coerce").to_numpy(dtype=float)
    control = np.zeros(adata.n_obs, dtype=bool)
    if control_key is not None:
        if control_key not in adata.obs:
            raise KeyError(f"`control_key={control_key!r}` is not a column of adata.obs.")
        control = control_flags(adata.obs, control_key)
    seen = np.unique(doses[~control & np.isfinite(doses)])
    for value, what in ((dose, "dose"), (validation_dose, "validation_dose")):
        if value is not None and not np.isclose(seen, value).any():
            raise ValueError(
                f"{what}={value} is not a dose of any perturbed cell (doses: {seen.tolist()})."
            )
    split = np.full(adata.n_obs, "train", dtype=object)
    split[~control & np.isclose(doses, dose)] = "test"
    if validation_dose is not None:
        split[~control & np.isclose(doses, validation_dose)] = "valid"
    adata.obs[key_added] = pd.Categorical(split, categories=["train", "valid", "test"])
