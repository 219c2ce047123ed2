"""Training and evaluation of one stage: state, per-device steps, the loop.

A *stage* trains one model (the teacher, a student, a baseline) with a stage
loss from :mod:`mamba_pkd.losses`, against *frozen* models that are arguments of
the step, never part of the state, the optimizer or the checkpoint:

    train_step(state, batch, frozen, rng) -> (state, metrics)

``frozen`` is a :class:`Frozen` pytree of parameters (the teacher and the
earlier students), replicated over devices. When a stage has no random
augmentation, the frozen models' outputs on the training set are computed
once and passed inside the batch instead (``batch["teacher_logits"]``,
``batch["prefix_logits"]``, ``batch["prev_features"]``), which removes their
forward pass from every step.

The steps are per-device functions with an explicit ``lax.pmean`` over the
axis ``"batch"``; :mod:`mamba_pkd.parallel` maps them over devices.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mamba_pkd import ensemble, losses, parallel
from mamba_pkd import data as data_lib
from mamba_pkd.metrics import MetricsWriter
from mamba_pkd.models import ModelConfig, apply_members, create_model, init_params

Array = jax.Array
PyTree = Any


class NonFiniteLossError(RuntimeError):
  """Raised when a stage's loss becomes NaN or Inf."""


# ----------------------------------------------------------------------------
# State and optimizer.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """What a stage optimises and checkpoints (never a frozen model).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the trained model's parameters.
    opt_state: optax state of ``params``.
  """

  step: Array
  params: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Static optimisation settings of a stage (plain values, validated)."""

  learning_rate: float = 2e-3
  weight_decay: float = 0.05
  warmup_fraction: float = 0.05
  epochs: int = 10
  batch_size: int = 128
  grad_clip: float = 1.0
  min_steps: int = 0

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
    if self.epochs < 1:
      raise ValueError(f"epochs must be >= 1, got {self.epochs}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.grad_clip < 0:
      raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
    if (
        isinstance(self.min_steps, bool)
        or not isinstance(self.min_steps, int)
        or self.min_steps < 0
    ):
      raise ValueError(f"min_steps must be an int >= 0 (0 = epochs only), got {self.min_steps!r}")


def stage_steps(num_train: int, batch_size: int, epochs: int, min_steps: int = 0) -> int:
  """Training steps of a stage: ``max(epochs * steps_per_epoch, min_steps)``.

  ``steps_per_epoch = num_train // batch_size`` (every batch full, as the loop trains);
  ``min_steps`` keeps a small dataset from being trained for only a handful of steps
  (1,438 digits at batch 128 are 11 batches an epoch). The last epoch may be partial.
  """
  return max(epochs * data_lib.steps_per_epoch(num_train, batch_size), min_steps)


def create_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay to 0 (plus global-norm clipping)."""
  warmup = max(1, int(optim.warmup_fraction * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, optim.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1)
  )
  adamw = optax.adamw(schedule, weight_decay=optim.weight_decay)
  if optim.grad_clip:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw


def create_train_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
  # The optimizer's state in one jitted program (eagerly, every leaf's zeros would be a program
  # of its own, compiled for each new shape).
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params)
  )


# ----------------------------------------------------------------------------
# Frozen models.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class Frozen:
  """Parameters of the frozen models a stage reads (a pytree; replicated).

  Attributes:
    teacher: parameters of the model whose logits are ``"teacher"`` (in chain
      mode the previous model), or None.
    students: parameters of the earlier students whose summed logits are
      ``"prefix"`` (ensemble mode), in order; may be empty.
  """

  teacher: PyTree = None
  students: tuple = ()


@dataclasses.dataclass(frozen=True)
class FrozenSpec:
  """Static side of :class:`Frozen`: the model configs, in the same order."""

  teacher: ModelConfig | None = None
  students: tuple[ModelConfig, ...] = ()


def frozen_outputs(spec: FrozenSpec, frozen: Frozen, batch: Mapping[str, Array]) -> dict:
  """The frozen models' outputs for a batch: cached in the batch, or computed.

  Returns a dict with any of ``"teacher"`` [B, K], ``"prefix"`` [B, K] and
  ``"prev_features"`` [B, d], all wrapped in ``stop_gradient``.
  """
  out = {}
  if "teacher_logits" in batch:
    out["teacher"] = batch["teacher_logits"]
  elif spec.teacher is not None:
    out["teacher"] = create_model(spec.teacher).apply({"params": frozen.teacher}, batch["image"])
  if "prefix_logits" in batch:
    out["prefix"] = batch["prefix_logits"]
    if "prev_features" in batch:
      out["prev_features"] = batch["prev_features"]
  elif spec.students:
    logits, features = apply_members(spec.students, frozen.students, batch["image"])
    out["prefix"] = ensemble.prefix_logits(logits)
    out["prev_features"] = features[-1]
  return jax.tree.map(jax.lax.stop_gradient, out)


# ----------------------------------------------------------------------------
# Per-device steps.
# ----------------------------------------------------------------------------


def make_train_step(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    stage_loss: losses.StageLoss,
    spec: FrozenSpec,
) -> Callable:
  """Returns the per-device ``train_step(state, batch, frozen, rng)``.

  ``batch`` holds ``image`` [b, H, W, C], ``label`` [b] and optionally the
  cached frozen outputs; gradients and metrics are averaged over the axis
  ``"batch"`` with ``lax.pmean``.
  """
  model = create_model(model_config)

  def train_step(state: TrainState, batch: Mapping[str, Array], frozen: Frozen, rng: Array):
    # ``rng`` is this device's key for the stage (parallel.device_keys); a stochastic layer
    # would use jax.random.fold_in(rng, state.step). The models are deterministic.
    del rng
    context = frozen_outputs(spec, frozen, batch)
    prev_features = context.pop("prev_features", None)
    if not model_config.connect_dim:
      prev_features = None

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["image"], prev_features)
      named = {"student": logits, **context}
      if "teacher" in named:
        named["previous"] = named["teacher"]  # chain mode's name for the same model
      loss, metrics = stage_loss(named, batch["label"], batch.get("example_weight"))
      return loss, (metrics, logits)

    (loss, (metrics, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(
        metrics,
        loss=loss,
        accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        grad_norm=_global_norm(grads),
    )
    metrics = jax.lax.pmean(metrics, parallel.AXIS)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _global_norm(tree: PyTree) -> Array:
  """sqrt of the sum of squares of every leaf (optax renamed its helper across versions)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# The stage loop.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class StageData:
  """What a stage trains on.

  Attributes:
    dataset: the :class:`mamba_pkd.data.Dataset`.
    train_index: rows of ``dataset.x_train`` used for training (the rest may
      be a held-out split).
    augment: augmentation name for :func:`mamba_pkd.data.train_batches`.
    cached: per-row frozen outputs (``teacher_logits`` [R, K],
      ``prefix_logits`` [R, K], ``prev_features`` [R, d]). Without ``views``
      the rows are those of ``x_train`` and the tables are used only when
      ``augment == "none"``; with ``views`` they are the pool's rows
      ``view * n + position`` (``n = len(train_index)``).
    views: optional uint8 [V, n, H, W, C], fixed augmented copies of the
      training rows (view 0 = the originals, from
      :func:`mamba_pkd.data.augmented_views`). Each epoch trains on one view of
      every row, drawn by :func:`mamba_pkd.data.epoch_views`; ``augment`` is
      then not applied again.
  """

  dataset: data_lib.Dataset
  train_index: np.ndarray
  augment: str = "none"
  cached: Mapping[str, np.ndarray] | None = None
  views: np.ndarray | None = None

  def __post_init__(self):
    if self.views is not None and self.views.shape[1:2] != (len(self.train_index),):
      raise ValueError(
          f"views must be [V, {len(self.train_index)}, H, W, C] (one copy of each "
          f"training row per view), got shape {self.views.shape}"
      )

  def describe(self) -> str:
    if self.views is not None:
      return f"{self.views.shape[0]} fixed {self.augment} views per image" + (
          ", frozen outputs cached" if self.cached else ""
      )
    if self.augment == "none":
      return "no augmentation" + (", frozen outputs cached" if self.cached else "")
    return f"live {self.augment} augmentation"

  @property
  def uses_cache(self) -> bool:
    """Whether the batches carry the cached frozen outputs (else frozen models run live)."""
    return bool(self.cached) and (self.views is not None or self.augment == "none")


def _stage_batches(data: StageData, *, batch_size: int, seed: int, epoch: int) -> Iterator[dict]:
  """Training batches of the stage's rows, with cached frozen outputs attached."""
  ds = data.dataset
  n = len(data.train_index)
  if data.views is not None:
    view = data_lib.epoch_views(n, data.views.shape[0], seed, epoch)  # [n]
    images, augment = data.views[view, np.arange(n)], "none"
  else:
    view, images, augment = None, ds.x_train[data.train_index], data.augment
  sub = dataclasses.replace(ds, x_train=images, y_train=ds.y_train[data.train_index])
  for batch in data_lib.train_batches(
      sub,
      batch_size=batch_size,
      seed=seed,
      epoch=epoch,
      augment=augment,
      **parallel.batch_layout(),
  ):
    out = {"image": batch["image"], "label": batch["label"]}
    if data.uses_cache:
      position = batch["index"]
      rows = view[position] * n + position if view is not None else data.train_index[position]
      for name, table in data.cached.items():
        out[name] = table[rows]
    yield out


# The host dispatches at most this many steps ahead of the devices. With many
# more queued, XLA's CPU client (JAX 0.10.2, host devices on 2 cores) sometimes
# deadlocks in the gradient all-reduce when queued steps share an input buffer
# (the replicated frozen models) and aborts the process after 40 s; see
# experiments/dispatch_stress.py for the reproduction and the counts.
MAX_STEPS_AHEAD = 4


def train_stage(
    *,
    name: str,
    model_config: ModelConfig,
    stage_loss: losses.StageLoss,
    optim: OptimConfig,
    data: StageData,
    seed: int,
    spec: FrozenSpec = FrozenSpec(),
    frozen: Frozen = Frozen(),
    checkpointer=None,
    checkpoint_every: int = 200,
    metrics_writer: MetricsWriter | None = None,
    log_every: int = 50,
    init: PyTree | None = None,
) -> PyTree:
  """Trains one stage and returns its parameters (host NumPy).

  Resumes from ``checkpointer``'s latest good step if there is one. Raises
  :class:`NonFiniteLossError` (naming the stage and step range) if the loss
  turns NaN/Inf; the last good checkpoint is kept.
  """
  parallel.check_batch_divisible(optim.batch_size, "batch_size")
  num_train = len(data.train_index)
  steps_per_epoch = data_lib.steps_per_epoch(num_train, optim.batch_size)
  if steps_per_epoch < 1:
    raise ValueError(
        f"stage {name}: batch_size={optim.batch_size} is larger than the "
        f"{num_train} training examples"
    )
  total_steps = stage_steps(num_train, optim.batch_size, optim.epochs, optim.min_steps)
  num_epochs = -(-total_steps // steps_per_epoch)  # the last one partial with min_steps
  tx = create_optimizer(optim, total_steps)
  rng = jax.random.key(seed)

  def initial_state():
    params = init if init is not None else init_params(model_config, jax.random.fold_in(rng, 0))
    return create_train_state(params, tx)

  # Restored against the state's shapes alone: initialising a model compiles its random
  # draws (1-3 s a config at XLA's defaults on a 2-core CPU), wasted on a resume.
  restored = None
  if checkpointer is not None:
    restored = checkpointer.restore_latest(jax.eval_shape(initial_state))
  if restored is not None:
    start, host_state = restored
    state = jax.tree.map(jax.device_put, host_state)
    logging.info("stage %s: resuming from step %d of %d", name, start, total_steps)
  else:
    start, state = 0, initial_state()
  start = parallel.agree(start, f"stage {name}: step to resume from")  # also a barrier
  if start >= total_steps:
    return parallel.to_host(state.params)

  step_fn = parallel.data_parallel(
      make_train_step(model_config, tx, stage_loss, spec), donate_first=True
  )
  state_r = parallel.replicate(state)
  frozen_r = parallel.replicate(frozen)
  keys_r = parallel.device_keys(rng)
  logging.info(
      "stage %s: %d steps (%d epochs x %d), batch %d, %s, on %s; compiling...",
      name,
      total_steps,
      num_epochs,
      steps_per_epoch,
      optim.batch_size,
      data.describe(),
      parallel.describe_devices(),
  )
  last_good = start
  t_start, t_window, window_steps = time.time(), None, 0
  pending: list[dict[str, Array]] = []  # per-step metrics since the last log line, on device
  step = start
  for epoch in range(start // steps_per_epoch, num_epochs):
    skip = start - epoch * steps_per_epoch if epoch == start // steps_per_epoch else 0
    for i, batch in enumerate(
        _stage_batches(data, batch_size=optim.batch_size, seed=seed, epoch=epoch)
    ):
      if i < skip:
        continue
      state_r, metrics = step_fn(state_r, batch, frozen_r, keys_r)
      step += 1
      window_steps += 1
      if t_window is None:  # first step: compile finished
        jax.block_until_ready(metrics)
        logging.info("stage %s: compiled in %.1fs", name, time.time() - t_start)
        t_window, window_steps = time.time(), 0
      # Kept as the step returned them: adding them up here would dispatch a few
      # tiny device ops per step (measured ~10 ms/step for a small student).
      pending.append(metrics)
      if len(pending) > MAX_STEPS_AHEAD:
        jax.block_until_ready(pending[-MAX_STEPS_AHEAD - 1])
      at_end = step == total_steps
      if step % log_every == 0 or at_end or step % checkpoint_every == 0:
        fetched = jax.device_get(pending)  # one transfer: [{name: [devices]}] per step
        host = {k: float(np.mean([m[k][0] for m in fetched])) for k in fetched[0]}
        pending = []
        if not all(math.isfinite(v) for v in host.values()):
          raise NonFiniteLossError(
              f"stage {name}: non-finite loss or gradient between steps {last_good} and "
              f"{step} (metrics {host}); the last good checkpoint (step {last_good}) is kept. "
              "Lower the learning rate or check the input data."
          )
        elapsed = time.time() - t_window
        rate = window_steps / elapsed if elapsed > 0 and window_steps else float("nan")
        eta = (total_steps - step) / rate if rate == rate and rate > 0 else float("nan")
        logging.info(
            "stage %s: step %d/%d (epoch %d) loss %.4f acc %.3f | %.1f steps/s, " "ETA %.0fs",
            name,
            step,
            total_steps,
            epoch + 1,
            host["loss"],
            host["accuracy"],
            rate,
            eta,
        )
        if metrics_writer is not None:
          metrics_writer.write(name, step, dict(host, steps_per_sec=rate))
        if checkpointer is not None and (step % checkpoint_every == 0 or at_end):
          checkpointer.save(step, parallel.unreplicate(state_r))
        last_good = step
      if step == total_steps:
        break
  return parallel.unreplicate(state_r).params
