"""gim_scvi: Generative Intervention Models for unseen perturbations, on scvi-tools."""

from importlib.metadata import PackageNotFoundError, version

from gim_scvi import data, pl, pp, tl
from gim_scvi.model import GIM

try:
    __version__ = version("gim_scvi")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "0.0.0"

__all__ = ["GIM", "__version__", "data", "pl", "pp", "tl"]
