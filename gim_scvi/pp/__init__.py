"""Preprocessing: perturbation features."""

from gim_scvi.pp._featurize import (
    featurize_smiles,
    morgan_fingerprints,
    rdkit_descriptors,
    smiles_to_features,
)

__all__ = ["featurize_smiles", "morgan_fingerprints", "rdkit_descriptors", "smiles_to_features"]
