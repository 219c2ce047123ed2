"""mamba-pkd: Progressive Knowledge Distillation into Mamba students (JAX/Flax).

The pure pieces need no config object::

    from mamba_pkd import selective_scan, MambaMixer, MambaClassifier, ModelConfig
    from mamba_pkd import losses, flops

The names are imported lazily (on first attribute access), so that
``import mamba_pkd.edge.runtime`` works where JAX is not installed.
"""

import importlib

_LAZY = {
    "MambaClassifier": "mamba_pkd.models",
    "MambaMixer": "mamba_pkd.layers",
    "ModelConfig": "mamba_pkd.models",
    "PatchEmbed": "mamba_pkd.layers",
    "RMSNorm": "mamba_pkd.layers",
    "ResidualBlock": "mamba_pkd.layers",
    "SCAN_METHODS": "mamba_pkd.ssm",
    "init_params": "mamba_pkd.models",
    "ladder_configs": "mamba_pkd.models",
    "selective_scan": "mamba_pkd.ssm",
}
_SUBMODULES = ("flops", "losses")

__all__ = sorted([*_LAZY, *_SUBMODULES])
__version__ = "0.1.0"


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"mamba_pkd.{name}")
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'mamba_pkd' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *__all__])
