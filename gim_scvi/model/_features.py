"""Per-cell perturbation features, stored as their distinct rows and an index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class FeatureRows:
    """The ``cells x P`` feature matrix as ``unique[inverse]``.

    A screen has a few hundred distinct feature rows (one per compound) but up to millions of
    cells; keeping only the distinct rows makes the per-cell features cost one integer per
    cell instead of ``P`` floats.

    Parameters
    ----------
    unique
        Distinct feature rows, ``U x P`` float32, sorted lexicographically (as
        :func:`numpy.unique` sorts them).
    inverse
        Row of ``unique`` of each cell.
    """

    unique: np.ndarray
    inverse: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_cells, P)`` of the full matrix."""
        return (len(self.inverse), self.unique.shape[1])

    def __len__(self) -> int:
        return len(self.inverse)

    def __getitem__(self, cells) -> np.ndarray:
        """Dense feature rows of the given cells (index, slice or boolean mask)."""
        return self.unique[self.inverse[cells]]

    def zero_rows(self) -> np.ndarray:
        """Boolean mask of the cells whose feature row is all zero."""
        return ~np.any(self.unique != 0, axis=1)[self.inverse]

    def treated_mean_std(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Column mean and standard deviation over ``cells`` (a mask or index)."""
        counts = np.bincount(self.inverse[cells], minlength=len(self.unique)).astype(np.float64)
        total = counts.sum()
        mean = counts @ self.unique / total
        var = counts @ (self.unique - mean) ** 2 / total
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def zero_rows(features, chunk_size: int = 65_536) -> np.ndarray:
    """Boolean mask of the all-zero rows of a dense or sparse matrix, read in chunks."""
    if isinstance(features, pd.DataFrame):
        features = features.to_numpy()
    if sp.issparse(features):
        return np.asarray(features.getnnz(axis=1) == 0).reshape(-1)
    features = np.asarray(features)
    return np.concatenate(
        [np.zeros(0, dtype=bool)]
        + [
            ~np.any(features[i : i + chunk_size] != 0, axis=1)
            for i in range(0, features.shape[0], chunk_size)
        ]
    )


def feature_rows(features, chunk_size: int = 65_536) -> FeatureRows:
    """Distinct rows of a dense or sparse ``cells x P`` matrix, read in chunks.

    Never holds more than ``chunk_size`` dense rows at once, so a sparse fingerprint matrix of
    a whole screen is never densified.

    Parameters
    ----------
    features
        Dense array, DataFrame or scipy sparse matrix.
    chunk_size
        Rows densified at a time.
    """
    if isinstance(features, pd.DataFrame):
        features = features.to_numpy()
    n_cells = features.shape[0]
    seen: dict[bytes, int] = {}
    rows: list[np.ndarray] = []
    inverse = np.empty(n_cells, dtype=np.int64)
    for start in range(0, n_cells, chunk_size):
        chunk = features[start : start + chunk_size]
        chunk = chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk)
        distinct, local = _distinct_rows(np.ascontiguousarray(chunk, dtype=np.float32))
        ids = np.empty(len(distinct), dtype=np.int64)
        for i, row in enumerate(distinct):
            key = row.tobytes()
            if key not in seen:
                seen[key] = len(rows)
                rows.append(row)
            ids[i] = seen[key]
        inverse[start : start + chunk_size] = ids[local]
    width = features.shape[1]
    unique = np.stack(rows) if rows else np.zeros((0, width), np.float32)
    # sort like numpy.unique so that the order does not depend on the chunking
    unique, order = np.unique(unique, axis=0, return_inverse=True)
    return FeatureRows(unique=unique, inverse=order.reshape(-1)[inverse])


def _distinct_rows(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a dense chunk and each row's position among them.

    Rows are grouped by a 64-bit hash (pandas, vectorised) and then compared in full, so a
    hash collision cannot merge different rows (it falls back to :func:`numpy.unique`).
    """
    if chunk.shape[1] == 0 or chunk.shape[0] == 0:
        return np.unique(chunk, axis=0, return_inverse=True)
    hashes = pd.util.hash_pandas_object(pd.DataFrame(chunk), index=False).to_numpy()
    local, _ = pd.factorize(hashes)
    first = np.full(local.max() + 1, -1, dtype=np.int64)
    first[local[::-1]] = np.arange(len(local))[::-1]
    distinct = chunk[first]
    if not np.array_equal(distinct[local], chunk):
        distinct, local = np.unique(chunk, axis=0, return_inverse=True)
    return distinct, local.reshape(-1)
