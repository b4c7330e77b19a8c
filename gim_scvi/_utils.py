"""Small helpers shared by the model and the tools."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import scipy.sparse as sp

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
    categorical = isinstance(col.dtype, pd.CategoricalDtype)
    series = pd.Series(col.to_numpy(), index=col.index)  # a categorical's values, NaN if missing
    if series.isna().any():
        example = str(series.index[series.isna().to_numpy()][0])
        raise ValueError(
            f"adata.obs[{control_key!r}] has {int(series.isna().sum())} missing value(s) (e.g. "
            f"cell {example!r}); set each cell's control flag to True or False."
        )
    plain = strings or not categorical  # setup registers plain boolean / numeric columns only
    if plain and pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=bool)
    if plain and pd.api.types.is_numeric_dtype(series):
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


def first_non_count_rows(x, n_blocks: int = 8, block_rows: int = 250) -> slice | None:
    """The first block of rows of ``x`` with negative or non-integer values, or ``None``.

    Reads ``n_blocks`` contiguous blocks of rows spread evenly over the whole matrix (dense,
    sparse or backed), so data concatenated from counts and log-normalised parts is caught
    without reading everything.
    """
    n_obs = x.shape[0]
    if n_obs <= n_blocks * block_rows:
        blocks = [slice(0, n_obs)]
    else:
        starts = np.linspace(0, n_obs - block_rows, n_blocks).astype(int)
        blocks = [slice(int(s), int(s) + block_rows) for s in starts]
    for rows in blocks:
        block = x[rows]
        data = np.asarray(block.data if sp.issparse(block) else block, dtype=np.float64)
        if data.size and (np.any(data < 0) or np.any(np.abs(data - np.round(data)) > 1e-6)):
            return rows
    return None
