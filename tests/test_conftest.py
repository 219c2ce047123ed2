"""The suite's own settings (tests/conftest.py)."""

import os

import conftest


def test_an_unknown_xla_flag_is_rejected_not_fatal():
  """XLA aborts a process whose XLA_FLAGS names a flag it does not know; the probe that
  guards the suite's compile-speed flags must see that as "not accepted" (a jaxlib without
  the flag then runs the suite without it), not take this process down."""
  assert conftest._xla_accepts("--xla_mamba_pkd_no_such_flag=1") is False  # pylint: disable=protected-access
  assert "--xla_mamba_pkd_no_such_flag" not in os.environ.get("XLA_FLAGS", "")
