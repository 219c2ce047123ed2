"""mamba-pkd: Progressive Knowledge Distillation into Mamba students (JAX/Flax).

The pure pieces need no config object::

    from mamba_pkd import selective_scan, MambaMixer, MambaClassifier, ModelConfig
    from mamba_pkd import losses, flops

Names are imported on first use (PEP 562), so that ``from mamba_pkd.export
import load_export`` (deployment) loads neither Flax nor optax, Orbax or TFDS.
"""

import importlib

_NAMES = {
    "MambaClassifier": "mamba_pkd.models",
    "MambaMixer": "mamba_pkd.layers",
    "ModelConfig": "mamba_pkd.models",
    "PatchEmbed": "mamba_pkd.layers",
    "RMSNorm": "mamba_pkd.layers",
    "ResidualBlock": "mamba_pkd.layers",
    "SCAN_METHODS": "mamba_pkd.ssm",
    "ScanMethod": "mamba_pkd.ssm",
    "init_params": "mamba_pkd.models",
    "ladder_configs": "mamba_pkd.ladders",
    "selective_scan": "mamba_pkd.ssm",
}
_MODULES = (
    "anytime", "cascade", "checkpoints", "cnn_mlp", "combine", "comparisons", "data", "edge",
    "ensemble", "evaluate", "export", "flops", "ladders", "layers", "losses", "manifest", "metrics",
    "models", "paired", "parallel", "pkd", "predict", "preprocessing", "provenance", "report",
    "runs", "sanity", "settings", "sidecar", "ssm", "stages", "train", "weak_learner",
    "workdir_lock",
)  # fmt: skip

__all__ = sorted(_NAMES) + ["flops", "losses"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in _NAMES:
    value = getattr(importlib.import_module(_NAMES[name]), name)
  elif name in _MODULES:
    value = importlib.import_module(f"mamba_pkd.{name}")
  else:
    raise AttributeError(f"module 'mamba_pkd' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_NAMES) | set(_MODULES))
