"""mamba-pkd: Progressive Knowledge Distillation into Mamba students (JAX/Flax).

The pure pieces need no config object::

    from mamba_pkd import selective_scan, MambaMixer, MambaClassifier, ModelConfig
    from mamba_pkd import losses, flops
"""

from mamba_pkd import flops, losses
from mamba_pkd.layers import MambaMixer, PatchEmbed, ResidualBlock, RMSNorm
from mamba_pkd.models import MambaClassifier, ModelConfig, init_params, ladder_configs
from mamba_pkd.ssm import SCAN_METHODS, ScanMethod, selective_scan

__all__ = [
    "MambaClassifier",
    "MambaMixer",
    "ModelConfig",
    "PatchEmbed",
    "RMSNorm",
    "ResidualBlock",
    "SCAN_METHODS",
    "ScanMethod",
    "flops",
    "init_params",
    "ladder_configs",
    "losses",
    "selective_scan",
]
__version__ = "0.1.0"
