"""`python -m mamba_pkd.main` restarts itself once with glibc's huge-page malloc tunable.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so ``main.run`` re-executes the
same command with ``glibc.malloc.hugetlb=1`` added (see ``main.MALLOC_TUNABLE`` for why).
Checked in a child process that calls the same function and prints what it then sees: the
tunable is set, the user's own tunables are kept, the process id and arguments are those it
was started with, and ``$MAMBA_PKD_MALLOC_REEXEC`` turns the restart off.
"""

import os
import subprocess
import sys

import pytest

from mamba_pkd import main

pytestmark = pytest.mark.skipif(
    not main.is_glibc(), reason="the restart applies to glibc's malloc only"
)

# Counts its own starts in a file, restarts (maybe), then prints what the final process sees.
CHILD = r"""
import os, sys
with open(sys.argv[1], "a") as f:
  f.write("start\n")
from mamba_pkd import main
main._reexec_with_malloc_tunable()
print(os.getpid(), repr(os.environ.get("GLIBC_TUNABLES")), sys.argv[2:], flush=True)
"""


def _run(tmp_path, env_extra, drop=()):
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.pop(main.REEXEC_ENV, None)
  env.update(env_extra)
  starts = tmp_path / "starts.txt"
  proc = subprocess.Popen(
      [sys.executable, "-c", CHILD, str(starts), "--flag=1", "two"],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  pid, tunables, args = out.strip().split(" ", 2)
  return proc.pid, int(pid), eval(tunables), eval(args), starts.read_text().count("start")


def test_restarts_once_with_the_tunable(tmp_path):
  popen_pid, pid, tunables, args, starts = _run(tmp_path, {}, drop=("GLIBC_TUNABLES",))
  assert tunables == main.MALLOC_TUNABLE
  assert starts == 2  # the original start and exactly one restart
  assert pid == popen_pid  # exec keeps the process (a supervisor's pid stays valid)
  assert args == ["--flag=1", "two"]


def test_keeps_the_users_tunables(tmp_path):
  _, _, tunables, _, starts = _run(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.check=0"})
  assert tunables == "glibc.malloc.check=0:" + main.MALLOC_TUNABLE
  assert starts == 2


@pytest.mark.parametrize(
    "env",
    [{main.REEXEC_ENV: "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}],
    ids=["opted-out", "user-chose-hugetlb"],
)
def test_no_restart(tmp_path, env):
  _, _, tunables, _, starts = _run(tmp_path, env, drop=("GLIBC_TUNABLES",))
  assert starts == 1
  assert tunables == env.get("GLIBC_TUNABLES")
