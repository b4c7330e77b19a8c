"""The GIM model and its training plan."""

from gim_scvi.model._gim import GIM
from gim_scvi.model._trainingplan import GIMTrainingPlan

__all__ = ["GIM", "GIMTrainingPlan"]
