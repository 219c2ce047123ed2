"""Pure selective-scan functions (no Flax).

Modules: :mod:`~mamba_pkd.ssm.common` (method enum, validation), :mod:`~mamba_pkd.ssm.fused`
(the fused CPU method), :mod:`~mamba_pkd.ssm.pallas_scan` (the GPU kernel) and
:mod:`~mamba_pkd.ssm.scan` (the XLA methods and the dispatch :func:`selective_scan`).
"""

from mamba_pkd.ssm.common import SCAN_METHODS
from mamba_pkd.ssm.common import ScanMethod
from mamba_pkd.ssm.common import as_scan_method
from mamba_pkd.ssm.common import validate_scan_inputs
from mamba_pkd.ssm.scan import selective_scan
from mamba_pkd.ssm.scan import selective_scan_streams

__all__ = [
    "SCAN_METHODS",
    "ScanMethod",
    "as_scan_method",
    "selective_scan",
    "selective_scan_streams",
    "validate_scan_inputs",
]
