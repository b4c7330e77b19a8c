"""Small helpers shared by the model and the tools."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

_TRUE_STRINGS = {"true": True, "false": False, "1": True, "0": False}


def context_labels(
    names: Iterable[str], doses: Iterable[float] | None, lines: Iterable[str]
) -> np.ndarray:
    """Labels ``"perturbation | dose | cell line"`` (``"perturbation | cell line"`` without doses).

    The one label format for a perturbed context, shared by :meth:`GIM.get_interventions`,
    :func:`gim_scvi.tl.annotate` and :func:`gim_scvi.tl.evaluate` so that their tables align.
    """
    if doses is None:
        return np.array([f"{n} | {ln}" for n, ln in zip(names, lines, strict=True)])
    return np.array(
        [f"{n} | {float(d):g} | {ln}" for n, d, ln in zip(names, doses, lines, strict=True)]
    )


def control_flags(obs: pd.DataFrame, control_key: str, strings: bool = True) -> np.ndarray:
    """Boolean control flags from an obs column of bools, 0/1 numbers or "True"/"False".

    Anything else (missing values, other numbers or labels) raises an error that names the
    column and the fix, so that a flag is never read the wrong way round (``bool("False")``
    is ``True``).

    Parameters
    ----------
    obs
        The ``.obs`` table.
    control_key
        Its column with the flags.
    strings
        Also accept the strings ``"True"``/``"False"``/``"1"``/``"0"`` (any case) and
        categorical columns of flags; otherwise only boolean or numeric 0/1 columns (what
        :meth:`gim_scvi.GIM.setup_anndata` can register).
    """
    col = obs[control_key]
    values = col.to_numpy()
    if isinstance(col.dtype, pd.CategoricalDtype) and strings:
        values = col.cat.categories.to_numpy()[col.cat.codes.to_numpy()]
        if (col.cat.codes.to_numpy() < 0).any():
            values = np.where(col.cat.codes.to_numpy() < 0, np.nan, values.astype(object))
    series = pd.Series(values, index=col.index)
    if series.isna().any():
        example = str(series.index[series.isna().to_numpy()][0])
        raise ValueError(
            f"adata.obs[{control_key!r}] has {int(series.isna().sum())} missing value(s) (e.g. "
            f"cell {example!r}); set each cell's control flag to True or False."
        )
    if pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(series):
        numbers = series.to_numpy(dtype=np.float64)
        if not np.isin(numbers, (0.0, 1.0)).all():
            raise ValueError(
                f"adata.obs[{control_key!r}] must hold 0/1 or True/False; found values "
                f"{[float(v) for v in sorted(set(np.unique(numbers)) - {0.0, 1.0})][:5]}."
            )
        return numbers > 0
    if strings:
        flags = series.map(lambda v: _TRUE_STRINGS.get(str(v).strip().lower()))
        if flags.notna().all() and series.map(lambda v: isinstance(v, str | bool)).all():
            return flags.to_numpy(dtype=bool)
    others = sorted({str(v) for v in series.unique()})
    accepted = "boolean, 0/1 or 'True'/'False'" if strings else "boolean or 0/1"
    raise TypeError(
        f"adata.obs[{control_key!r}] has dtype {col.dtype} (values such as {others[:5]}); it "
        f"must be {accepted}. For a label column use e.g. "
        f"`adata.obs['control'] = adata.obs[{control_key!r}] == 'control'`."
    )
