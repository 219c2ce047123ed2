"""The one module that knows about devices and processes.

The training and evaluation steps in :mod:`mamba_pkd.train` are per-device
functions that reduce over the named axis ``"batch"`` with ``lax.pmean``; this
module wraps them with ``jax.pmap`` over the local devices (all processes'
devices together form the axis in a multi-host run), places replicated
arguments, and hides the multi-controller runtime (``jax.distributed``).

``jax.pmap`` is in maintenance mode from JAX 0.8 on; in JAX >= 0.8 it is
implemented on top of ``shard_map``, and it is what the user's design card
asks for. If a future JAX drops it, only :func:`data_parallel` changes.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

AXIS = "batch"


def local_device_count() -> int:
  return jax.local_device_count()


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def batch_layout() -> dict[str, int]:
  """How this process slices global batches: ``num_devices``, ``process_index``,
  ``process_count`` (keyword arguments of ``data.train_batches`` / ``data.eval_batches``)."""
  return dict(
      num_devices=local_device_count(), process_index=process_index(), process_count=process_count()
  )


def is_writer() -> bool:
  """True on the process that writes files (reports, checkpoints): process 0."""
  return jax.process_index() == 0


def set_host_device_count(requested: int, *, batch_sizes: tuple[int, ...] = ()) -> int:
  """Splits the host's CPU cores into several XLA devices (before any computation).

  XLA's CPU backend runs the scan's long chains of small ops on one thread, so
  one CPU device leaves cores idle; ``k`` host devices run ``k`` shards of each
  batch at once (measured here: a teacher step 2.8 s -> 1.3 s on 2 cores).
  Only the CPU platform is affected; accelerators keep their own devices.

  Args:
    requested: number of host devices; -1 picks the core count, reduced until
      it divides every one of ``batch_sizes``; 0 or 1 leaves one device.
    batch_sizes: global batch sizes that must split evenly over the devices.

  Returns:
    The device count set (or already set through ``XLA_FLAGS``).
  """
  flag = "--xla_force_host_platform_device_count"
  current = os.environ.get("XLA_FLAGS", "")
  if flag in current:
    return int(current.split(flag + "=")[1].split()[0])
  if requested < -1:
    raise ValueError(f"cpu_devices must be -1 (auto), 0, 1 or more, got {requested}")
  count = requested
  if requested == -1:
    count = os.cpu_count() or 1
    while count > 1 and any(b % count for b in batch_sizes):
      count -= 1
  count = max(count, 1)
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{current} {flag}={count}".strip()
  return count


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    auto: bool = False,
) -> None:
  """Starts JAX's multi-controller runtime (one call per process, before any jax op).

  Args:
    coordinator_address: "host:port" of process 0, or None with ``auto``.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    auto: let JAX detect the cluster (SLURM, Cloud TPU, ...).

  Raises:
    ValueError: inconsistent arguments (named in the message).
  """
  if auto:
    jax.distributed.initialize()
  else:
    if not coordinator_address:
      raise ValueError("coordinator_address must be 'host:port' (or pass auto=True)")
    if num_processes is None or num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is None or not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    # CPU collectives across processes need an implementation; gloo ships with jaxlib
    # (the default in JAX 0.10; set for older versions). It only affects the CPU client.
    # Not conditional on jax.default_backend(): that would start the backend, which
    # jax.distributed.initialize must precede.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  logging.info(
      "jax.distributed: process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def data_parallel(step: Callable, *, donate_first: bool = False) -> Callable:
  """``jax.pmap`` of a per-device step over the local devices, axis ``"batch"``.

  Every argument carries a leading device axis: batches come reshaped
  ``[local_devices, per_device, ...]`` and replicated arguments (train state,
  frozen models) are placed with :func:`replicate`.

  Args:
    step: per-device function.
    donate_first: donate the first argument's buffers (the train state).
  """
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if donate_first else ())


def replicate(tree: Any) -> Any:
  """Copies every leaf to all local devices: leaf [...] -> [local_devices, ...].

  The arrays go through a pmapped identity so that they carry exactly the
  placement a pmapped step returns: feeding a step's output back in then hits
  the same compiled executable (``jax.device_put_replicated`` is deprecated).
  """
  if not jax.tree.leaves(tree):
    return tree
  num = jax.local_device_count()
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num, *np.shape(x))), tree)
  return _pmapped_identity(stacked)


_pmapped_identity = jax.pmap(lambda tree: tree, axis_name=AXIS)


def unreplicate(tree: Any) -> Any:
  """Host NumPy copy of the first local device's replica: leaf [devices, ...] -> [...].

  A device array's first shard is read directly (``x[0]`` would be a small XLA program per
  leaf shape, compiled the first time each shape is seen).
  """

  def first(x):
    if isinstance(x, jax.Array):
      shard = np.asarray(x.addressable_data(0))
      if shard.shape == (1, *x.shape[1:]):
        return shard[0]
    return np.asarray(x)[0]

  return jax.tree.map(first, tree)


def device_keys(rng: jax.Array) -> jax.Array:
  """One key per local device, distinct across all devices of all processes, placed on
  its device: [local_devices] keys, made once per stage and passed to every step (a step
  that needs randomness folds in ``state.step`` on the device; splitting keys on the host
  for every step was ~40% of the main thread's samples in a small student's stage)."""
  keys = jax.random.split(rng, jax.device_count())
  start = jax.process_index() * jax.local_device_count()
  return _pmapped_identity(keys[start : start + jax.local_device_count()])


def gather_from_processes(array: np.ndarray) -> np.ndarray:
  """Concatenates each process's rows (same shape on every process) in process order."""
  if jax.process_count() == 1:
    return array
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  gathered = multihost_utils.process_allgather(array, tiled=False)  # [processes, ...]
  return np.concatenate(list(np.asarray(gathered)), axis=0)


# A barrier waits this long for a process that is still compiling or writing.
BARRIER_TIMEOUT_S = 1800
_barrier_ids = itertools.count()  # every process calls sync/agree in the same order


def _coordination_client():
  """The ``jax.distributed`` coordination-service client, or None.

  ``jax._src.distributed.global_state.client`` is private (JAX's own
  ``array_serialization`` uses it for barriers); if a JAX version moves it,
  :func:`sync` and :func:`agree` fall back to ``multihost_utils`` (logged).
  """
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  client = getattr(getattr(distributed, "global_state", None), "client", None)
  if client is None or not all(
      hasattr(client, m) for m in ("wait_at_barrier", "key_value_set", "blocking_key_value_get")
  ):
    logging.log_first_n(
        logging.WARNING,
        "jax.distributed client API not found in JAX %s; "
        "barriers fall back to multihost_utils (an XLA collective)",
        1,
        jax.__version__,
    )
    return None
  return client


def sync(name: str) -> None:
  """Barrier across processes (no-op on one process).

  Waits on the coordination service of ``jax.distributed`` (no XLA computation:
  nothing to compile, no CPU-collective timeout), up to ``BARRIER_TIMEOUT_S``.
  """
  if jax.process_count() == 1:
    return
  client = _coordination_client()
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(
      f"mamba_pkd/{next(_barrier_ids)}/{name}", timeout_in_ms=BARRIER_TIMEOUT_S * 1000
  )


def agree(value: int | bool | str, what: str) -> int | bool | str:
  """Returns ``value`` after checking that every process holds the same one.

  A barrier too. Used where processes decide from files (a stage is complete,
  the step a stage resumes from): a shared directory that some host sees
  differently would otherwise make the processes run different steps and hang.

  Raises:
    RuntimeError: the processes disagree (every process's value is named).
  """
  if jax.process_count() == 1:
    return value
  client = _coordination_client()
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    encoded = np.frombuffer(repr(value).encode().ljust(256)[:256], np.uint8)  # [256]
    gathered = np.asarray(multihost_utils.process_allgather(encoded, tiled=False))  # [P, 256]
    values = [bytes(row).decode(errors="replace").rstrip() for row in gathered]
  else:
    key = f"mamba_pkd/{next(_barrier_ids)}/{what}"
    client.key_value_set(f"{key}/{jax.process_index()}", repr(value))
    client.wait_at_barrier(key, timeout_in_ms=BARRIER_TIMEOUT_S * 1000)
    values = [
        client.blocking_key_value_get(f"{key}/{i}", BARRIER_TIMEOUT_S * 1000)
        for i in range(jax.process_count())
    ]
  if len(set(values)) > 1:
    raise RuntimeError(
        f"processes disagree on {what}: "
        + ", ".join(f"process {i}: {v}" for i, v in enumerate(values))
        + ". Every process must see the same --workdir (a shared file system) and config."
    )
  return value


def to_host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def describe_devices() -> str:
  devs = jax.local_devices()
  return (
      f"{len(devs)} local {devs[0].platform} device(s), process {jax.process_index()} of "
      f"{jax.process_count()}, {jax.device_count()} global"
  )


def check_batch_divisible(batch_size: int, name: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over all devices."""
  devices = jax.device_count()
  if batch_size % devices:
    raise ValueError(
        f"{name}={batch_size} is not divisible by the number of devices ({devices} = "
        f"{jax.process_count()} process(es) x {jax.local_device_count()} local device(s)); "
        f"use a multiple of {devices}"
    )
