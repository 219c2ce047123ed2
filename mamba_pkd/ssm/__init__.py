"""Pure selective-scan functions (no Flax)."""

from mamba_pkd.ssm.scan import SCAN_METHODS
from mamba_pkd.ssm.scan import selective_scan

__all__ = ["SCAN_METHODS", "selective_scan"]
