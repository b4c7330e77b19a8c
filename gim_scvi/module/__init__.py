"""Torch modules of gim_scvi."""

from gim_scvi.module._decoder import ProgramDecoder
from gim_scvi.module._generator import GeneratorEnsemble, InterventionGenerator
from gim_scvi.module._module import GIMModule
from gim_scvi.module._scm import LatentSCM

__all__ = [
    "GIMModule",
    "GeneratorEnsemble",
    "InterventionGenerator",
    "LatentSCM",
    "ProgramDecoder",
]
