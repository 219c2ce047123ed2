r"""Training-step time and page faults with and without glibc's huge-page malloc tunable.

``python -m mamba_pkd.main`` restarts itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(``mamba_pkd.main.MALLOC_TUNABLE``). This measures what that buys: the default run's
train step (bidirectional, 2 host devices, CE loss, batch 128) of each size in ``--sizes``, in child
processes started alternately without and with the tunable (``--rounds`` times each), and
prints the median ms per step, the child's minor page faults, the ratio, and whether the
parameters after the timed steps are bit-for-bit the same.

  python experiments/bench_malloc.py --sizes teacher,s5 --rounds 2
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

from mamba_pkd import main as main_lib

CHILD = r"""
import os, sys, time
import jax, numpy as np
from mamba_pkd import ladders, losses, parallel, train
size, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = ladders.ladder_configs(
    "auto", image_shape=(28, 28, 1), num_classes=10, bidirectional=True)[size]  # as configs/default.py
tx = train.create_optimizer(train.OptimConfig(epochs=64), 1792)
state = train.create_train_state(train.init_params(config, jax.random.key(0)), tx)
step = jax.pmap(train.make_train_step(config, tx, losses.hard(), train.FrozenSpec()),
                axis_name=parallel.AXIS, donate_argnums=(0,))
nd = jax.local_device_count()
rng = np.random.default_rng(0)
batches = [{"image": rng.random((nd, 128 // nd, 28, 28, 1), dtype=np.float32),
            "label": rng.integers(0, 10, (nd, 128 // nd)).astype(np.int32)} for _ in range(20)]
frozen, keys = train.Frozen(), parallel.device_keys(jax.random.key(0))
s = parallel.replicate(state)
pending = []
def run(n, s):
  for i in range(n):
    s, m = step(s, batches[i % 20], frozen, keys)
    pending.append(m)
    if len(pending) > train.MAX_STEPS_AHEAD:  # as train.train_stage (see its deadlock note)
      jax.block_until_ready(pending[-train.MAX_STEPS_AHEAD - 1])
  return jax.block_until_ready(s)
s = run(3, s)
t = time.perf_counter()
s = run(steps, s)
print((time.perf_counter() - t) / steps * 1e3)
np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(parallel.unreplicate(s).params)])
"""


def child(size, steps, tunable, out):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  if tunable:
    env["GLIBC_TUNABLES"] = main_lib.MALLOC_TUNABLE
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
  proc = subprocess.run(
      [sys.executable, "-c", CHILD, size, str(steps), out],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  )
  faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
  return float(proc.stdout.strip().splitlines()[-1]), faults


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="teacher,s5")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default="/tmp/bench_malloc")
  args = parser.parse_args()
  import numpy as np  # pylint: disable=g-import-not-at-top

  os.makedirs(args.out, exist_ok=True)
  for size in args.sizes.split(","):
    steps = 40 if size == "teacher" else 300
    ms = {False: [], True: []}
    faults = {False: [], True: []}
    for _ in range(args.rounds):
      for tunable in (False, True):
        t, f = child(size, steps, tunable, f"{args.out}/{size}_{int(tunable)}.npz")
        ms[tunable].append(t)
        faults[tunable].append(f)
        print(
            f"{size} hugetlb={int(tunable)}: {t:.1f} ms/step, {f:,} minor faults "
            f"(load {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M:%S')})",
            flush=True,
        )
    a = np.load(f"{args.out}/{size}_0.npz")
    b = np.load(f"{args.out}/{size}_1.npz")
    same = all(np.array_equal(a[k], b[k]) for k in a)
    off, on = statistics.median(ms[False]), statistics.median(ms[True])
    print(
        f"{size}: median {off:.1f} -> {on:.1f} ms/step ({off / on:.2f}x), page faults "
        f"{statistics.median(faults[False]):,.0f} -> {statistics.median(faults[True]):,.0f}; "
        f"parameters after {steps + 3} steps bit-identical: {same}"
    )


if __name__ == "__main__":
  main()
