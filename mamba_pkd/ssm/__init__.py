"""Pure selective-scan functions (no Flax)."""
