r"""Stress test of the pmapped train step's dispatch queue on CPU host devices.

Why it exists: with many train steps queued ahead of the devices, XLA's CPU
client (seen with JAX 0.10.2, 2 host devices on 2 cores) sometimes deadlocks
in the gradient all-reduce -- one device waits at the rendezvous for the other
for 40 s, then the process aborts ("Termination timeout for `all reduce ...`").
It showed up when every queued step reads the same device buffers (here: one
rng array reused by every step; in training: the replicated frozen models).
``mamba_pkd.train.train_stage`` therefore never lets the host run more than
``MAX_STEPS_AHEAD`` steps ahead of the devices.

Each run trains students s1, s4, s1, s2 of the mnist ladder for ``--steps``
steps, reusing one rng array, with at most ``--steps_ahead`` steps in flight
(0 = unbounded), and prints ms/step. A deadlock ends the process with the
abort above after ~60 s; run it in a loop and count the aborts:

  for i in 1 2 3; do timeout 200 python experiments/dispatch_stress.py --steps_ahead=0; echo rc=$?; done
  for i in 1 2 3; do timeout 200 python experiments/dispatch_stress.py --steps_ahead=4; echo rc=$?; done

Measured on this 2-core machine (JAX 0.10.2, 300 steps a size). With the
earlier 4x4-patch ladder and XLA's grouped convolution: unbounded, 3 of 3 runs
aborted; 4 steps ahead, 0 of 5 (two of them at 1,000 steps a size), at the same
steps/s. With this script as committed: unbounded, 2 of 2 aborted; 4 steps
ahead, 0 of 2 (s1 7.9 and 8.4 ms/step, s4 25.3 and 27.4 ms/step).
"""

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from mamba_pkd import ladders, losses, models, parallel, train  # pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--steps_ahead",
      type=int,
      default=train.MAX_STEPS_AHEAD,
      help="most steps in flight (0: unbounded)",
  )
  parser.add_argument("--steps", type=int, default=300, help="steps per model")
  parser.add_argument("--batch_size", type=int, default=128)
  args = parser.parse_args()
  devices = jax.local_device_count()
  parallel.check_batch_divisible(args.batch_size)
  sizes = ladders.ladder_configs(
      "mnist", image_shape=(28, 28, 1), num_classes=10, bidirectional=True
  )
  print(
      f"{devices} devices, batch {args.batch_size}, steps ahead "
      f"{args.steps_ahead or 'unbounded'}",
      flush=True,
  )
  per_device = args.batch_size // devices
  rng_np = np.random.default_rng(0)
  batch = {
      "image": rng_np.standard_normal((devices, per_device, 28, 28, 1), np.float32),
      "label": rng_np.integers(0, 10, (devices, per_device)).astype(np.int32),
  }
  for size in ("s1", "s4", "s1", "s2"):
    config = sizes[size]
    tx = train.create_optimizer(train.OptimConfig(), args.steps)
    state = parallel.replicate(
        train.create_train_state(models.init_params(config, jax.random.key(0)), tx)
    )
    step = parallel.data_parallel(
        train.make_train_step(config, tx, losses.hard("student"), train.FrozenSpec()),
        donate_first=True,
    )
    frozen = parallel.replicate(train.Frozen())
    rngs = parallel.device_keys(jax.random.key(0))  # reused by every step, as in training
    state, metrics = step(state, batch, frozen, rngs)
    jax.block_until_ready(metrics)
    in_flight = collections.deque()
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch, frozen, rngs)
      in_flight.append(metrics)
      if args.steps_ahead and len(in_flight) > args.steps_ahead:
        jax.block_until_ready(in_flight.popleft())
    jax.block_until_ready(metrics)
    print(f"{size}: {(time.perf_counter() - start) / args.steps * 1e3:.1f} ms/step", flush=True)


if __name__ == "__main__":
  main()
