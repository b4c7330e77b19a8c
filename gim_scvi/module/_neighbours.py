"""Similarity between perturbations, for the neighbour part of the intervention distribution."""

from __future__ import annotations

import torch


def is_binary(values: torch.Tensor) -> bool:
    """Whether every entry is 0 or 1 (fingerprint bits)."""
    return bool(((values == 0) | (values == 1)).all())


def feature_similarity(
    features: torch.Tensor, seen: torch.Tensor, feature_std: torch.Tensor | None = None
) -> torch.Tensor:
    """Similarity of each row of ``features`` to each row of ``seen`` (``n x n_seen``).

    Tanimoto similarity when both are binary (fingerprint bits: 1 for equal rows, 0 for no
    shared bit). Otherwise minus the Euclidean distance between the rows divided by
    ``feature_std``, in units of the row's median distance to the ``seen`` rows (so that 0 is
    an equal row and -1 a typical one), which makes a temperature mean the same thing for any
    feature scale. Both are the similarity of the ``nearest_drug`` baseline up to that scale.

    Parameters
    ----------
    features
        ``n x P`` raw features.
    seen
        ``n_seen x P`` raw features of the training perturbations.
    feature_std
        ``P`` scales of the features for the Euclidean distance (ones if ``None``).
    """
    features = features.float()
    seen = seen.float()
    if is_binary(features) and is_binary(seen):
        shared = features @ seen.T
        union = features.sum(1, keepdim=True) + seen.sum(1)[None, :] - shared
        return torch.where(union > 0, shared / union.clamp(min=1e-12), torch.ones_like(union))
    if feature_std is not None:
        features = features / feature_std
        seen = seen / feature_std
    distance = torch.cdist(features, seen, compute_mode="donot_use_mm_for_euclid_dist")
    typical = distance.median(dim=1, keepdim=True).values.clamp(min=1e-9)
    return -distance / typical


def neighbour_weights(
    similarity: torch.Tensor, temperature: float, allowed: torch.Tensor
) -> torch.Tensor:
    """``softmax(similarity / temperature)`` over the ``allowed`` neighbours of each row.

    Parameters
    ----------
    similarity
        ``n x n_seen`` similarities (:func:`feature_similarity`).
    temperature
        Softmax temperature: small values give (nearly) all weight to the most similar one.
    allowed
        ``n x n_seen`` (or ``n_seen``) boolean mask of the neighbours a row may use.

    Returns
    -------
    ``n x n_seen`` weights; a row without any allowed neighbour gets all zeros.
    """
    allowed = allowed.expand_as(similarity)
    logits = torch.where(
        allowed, similarity / temperature, torch.full_like(similarity, -torch.inf)
    )
    weights = torch.softmax(logits, dim=1)
    return torch.where(allowed.any(1, keepdim=True), weights, torch.zeros_like(weights))
