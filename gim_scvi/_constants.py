"""Registry keys shared by the model and the module."""

from typing import NamedTuple


class _GIMRegistryKeys(NamedTuple):
    X_KEY: str = "X"
    BATCH_KEY: str = "batch"
    FEATURES_KEY: str = "perturbation_features"
    DOSE_KEY: str = "dose"
    CONTROL_KEY: str = "control"
    CELL_LINE_KEY: str = "cell_line"


GIM_REGISTRY_KEYS = _GIMRegistryKeys()
