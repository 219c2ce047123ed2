"""mamba-pkd: Progressive Knowledge Distillation into Mamba students (JAX/Flax).

The pure pieces need no config object::

    from mamba_pkd import selective_scan, MambaMixer, MambaClassifier, ModelConfig
    from mamba_pkd import losses, flops

The names below are imported on first use (PEP 562), so ``import
mamba_pkd.data`` reads datasets without importing JAX or Flax.
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
    "flops": None,  # a submodule
    "init_params": "mamba_pkd.models",
    "ladder_configs": "mamba_pkd.models",
    "losses": None,
    "selective_scan": "mamba_pkd.ssm",
}
__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'mamba_pkd' has no attribute {name!r}")
  module = _LAZY[name]
  value = (
      importlib.import_module(f"mamba_pkd.{name}")
      if module is None
      else getattr(importlib.import_module(module), name)
  )
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
