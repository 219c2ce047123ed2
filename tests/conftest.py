"""Shared test settings: a persistent XLA compilation cache for this process and
every subprocess a test starts (the suite compiles the same small models often)."""

import os
import pathlib
import sys
import tempfile

_CACHE = pathlib.Path(os.environ.get("MAMBA_PKD_TEST_CACHE",
                                     pathlib.Path(tempfile.gettempdir()) / "mamba_pkd_jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
