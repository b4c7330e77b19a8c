"""Input checks with messages that name the bad key or value and the fix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def check_obsm_features(adata: AnnData, features_key: str) -> np.ndarray:
    """Return the feature matrix of ``adata.obsm[features_key]`` after checking it."""
    if features_key not in adata.obsm:
        available = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise KeyError(
            f"adata.obsm[{features_key!r}] not found (available obsm keys: {available}). "
            "Store one feature row per cell there (zeros for controls), e.g. with "
            "`gim_scvi.pp.featurize_smiles`, and pass its key as `features_key`."
        )
    features = adata.obsm[features_key]
    if isinstance(features, pd.DataFrame):
        features = features.to_numpy()
    if sp.issparse(features):
        data = features.data
    else:
        features = np.asarray(features)
        data = features
    if features.ndim != 2:
        raise ValueError(
            f"adata.obsm[{features_key!r}] must be 2-D (cells x features), got shape "
            f"{features.shape}."
        )
    if not np.issubdtype(np.asarray(data).dtype, np.number) and data.dtype != bool:
        raise TypeError(
            f"adata.obsm[{features_key!r}] has dtype {data.dtype}; perturbation features must "
            "be numeric (convert with `.astype(np.float32)`)."
        )
    bad = ~np.isfinite(np.asarray(data, dtype=np.float64))
    if bad.any():
        raise ValueError(
            f"adata.obsm[{features_key!r}] contains {int(bad.sum())} NaN or infinite values. "
            "Impute or drop those features (controls should have all-zero rows)."
        )
    return features


def check_obs_key(adata: AnnData, key: str | None, argument: str) -> None:
    """Raise a clear error if an ``.obs`` column is missing."""
    if key is not None and key not in adata.obs:
        raise KeyError(
            f"`{argument}={key!r}` is not a column of adata.obs "
            f"(columns: {', '.join(map(repr, adata.obs.columns)) or 'none'})."
        )


def check_layer(adata: AnnData, layer: str | None) -> None:
    """Raise a clear error if a layer is missing."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"`layer={layer!r}` not found in adata.layers "
            f"(layers: {', '.join(map(repr, adata.layers.keys())) or 'none'}); "
            "use `layer=None` for counts in adata.X."
        )


def control_flags(adata: AnnData, control_key: str) -> np.ndarray:
    """Boolean control flags from an obs column of bools, 0/1 numbers or two strings."""
    col = adata.obs[control_key]
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype=np.float64)
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(
                f"adata.obs[{control_key!r}] must hold 0/1 or True/False; found values "
                f"{sorted(set(np.unique(values)) - {0.0, 1.0})[:5]}."
            )
        return values > 0
    raise TypeError(
        f"adata.obs[{control_key!r}] has dtype {col.dtype}; it must be boolean or 0/1. "
        f"For a label column use e.g. `adata.obs['control'] = adata.obs[{control_key!r}] == "
        "'control'`."
    )


def check_doses(adata: AnnData, dose_key: str, treated: np.ndarray) -> None:
    """Treated cells need a finite positive dose."""
    dose = pd.to_numeric(adata.obs[dose_key], errors="coerce").to_numpy(dtype=np.float64)
    bad = treated & ~(np.isfinite(dose) & (dose > 0))
    if bad.any():
        examples = adata.obs_names[bad][:3].tolist()
        raise ValueError(
            f"adata.obs[{dose_key!r}] must be a positive number for every perturbed cell; "
            f"{int(bad.sum())} perturbed cells have a dose <= 0 or NaN (e.g. {examples}). "
            "Fix those values or flag the cells as controls."
        )


def check_adata_shape(adata: AnnData) -> None:
    """Refuse empty AnnData and duplicate cell or gene names."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    for axis, names, fix in (
        ("obs_names", adata.obs_names, "adata.obs_names_make_unique()"),
        ("var_names", adata.var_names, "adata.var_names_make_unique()"),
    ):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:3].tolist()
            raise ValueError(f"adata.{axis} has duplicates (e.g. {dup}); run `{fix}` first.")
