"""Evaluation: predictions over whole arrays, CPU latency, and the report's rows.

:func:`predict_dataset` runs one model over every example of an array
(padding and mask, never a dropped remainder; each process evaluates its
slice and the slices are gathered). :func:`build_rows` turns a run's models
into :class:`mamba_pkd.report.Row` s: each model alone, each ensemble prefix
(summed by :mod:`mamba_pkd.ensemble`), each baseline, with FLOPs, accuracy,
agreement with the teacher and, optionally, measured latency.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mamba_pkd import ensemble, flops, parallel, report, runs, sanity
from mamba_pkd import data as data_lib
from mamba_pkd.combine import accuracy  # one owner: combine (pkd imports it from here)
from mamba_pkd.models import ModelConfig, create_model, feature_width

PyTree = Any


# ----------------------------------------------------------------------------
# Predictions over a whole array.
# ----------------------------------------------------------------------------


def make_predict_step(model_config) -> Callable:
  """Per-device ``predict_step(params, images, prev_features) -> (logits, features)``."""
  model = create_model(model_config)

  def predict_step(params, images, prev_features):
    return model.apply(
        {"params": params},
        images,
        prev_features if model_config.connect_dim else None,
        return_features=True,
    )

  return predict_step


@functools.lru_cache(maxsize=None)
def _pmapped_predict(model_config: ModelConfig) -> Callable:
  """One pmapped predict step per model config (compiled once per input shape)."""
  return parallel.data_parallel(make_predict_step(model_config))


def predict_dataset(
    model_config: ModelConfig,
    params: PyTree,
    images_uint8: np.ndarray,
    *,
    mean: np.ndarray,
    std: np.ndarray,
    batch_size: int,
    prev_features: np.ndarray | None = None,
    replicated_params: PyTree | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Logits and features of every example (padding and mask, no drop).

  Each process evaluates its slice of every batch; the slices are gathered, so
  every process returns the full arrays.

  Returns:
    (logits float32 [N, K], features float32 [N, models.feature_width(model_config)]).
  """
  predict = _pmapped_predict(model_config)
  rep = replicated_params if replicated_params is not None else parallel.replicate(params)
  num = len(images_uint8)
  logits_out = np.zeros((num, model_config.num_classes), np.float32)
  width_out = feature_width(model_config)
  feats_out = np.zeros((num, width_out), np.float32)
  width = prev_features.shape[1] if prev_features is not None else 1
  for batch in data_lib.eval_batches(
      images_uint8,
      np.zeros(num, np.int32),
      mean=mean,
      std=std,
      batch_size=batch_size,
      **parallel.batch_layout(),
  ):
    index = batch["index"]
    if prev_features is not None:
      prev = np.where(index[..., None] >= 0, prev_features[np.maximum(index, 0)], 0.0)
    else:
      prev = np.zeros(index.shape + (width,), np.float32)
    logits, feats = predict(rep, batch["image"], prev.astype(np.float32))
    index = parallel.gather_from_processes(np.asarray(index).reshape(-1))
    logits = parallel.gather_from_processes(
        np.asarray(logits).reshape(-1, model_config.num_classes)
    )
    feats = parallel.gather_from_processes(np.asarray(feats).reshape(-1, width_out))
    real = index >= 0
    logits_out[index[real]] = logits[real]
    feats_out[index[real]] = feats[real]
  return logits_out, feats_out


# ----------------------------------------------------------------------------
# Rows of the report.
# ----------------------------------------------------------------------------


LATENCY_BATCHES = (1, 256)  # the report's latency columns: per-image ms at these batches


class LatencyPrograms:
  """The report's latency programs, compiled once per (member configs, batch).

  A row's latency times the summed forward of its members' configs
  (:func:`mamba_pkd.runs.prefix_program`) at batch 1 and 256; rows of one size (a student,
  its baseline, prefix 1..1) share a program. Compiling them is most of the latency
  measurement's cost (the default run: 20 programs, 14 s of 17 s). :meth:`start` compiles
  them on one background thread while other work runs: ``pkd`` starts it once the students
  are distilled, so they compile while the baselines train (a small student's step leaves
  the cores partly idle, waiting on the two devices' all-reduce). A program not started
  ahead is compiled when first asked for. Timing is unchanged: the rows call the compiled
  program with the same arguments a jitted call would get.
  """

  def __init__(self, image_shape: Sequence[int]):
    self.image_shape = tuple(image_shape)
    self._futures: dict[tuple, concurrent.futures.Future] = {}
    self._executor: concurrent.futures.ThreadPoolExecutor | None = None

  def _compile(self, configs: tuple[ModelConfig, ...], params, batch: int):
    images = jax.ShapeDtypeStruct((batch, *self.image_shape), jnp.float32)
    return runs.prefix_program(configs).lower(params, images).compile()

  def start(self, groups: Sequence[Sequence[Any]], batches: Sequence[int] = LATENCY_BATCHES):
    """Queues every ``(configs, params)`` of ``groups`` (members' ``config`` and ``params``
    per row) at each of ``batches`` on the background thread."""
    if self._executor is None:
      self._executor = concurrent.futures.ThreadPoolExecutor(1, "latency-compile")
    queued = 0
    for members in groups:
      configs = tuple(m.config for m in members)
      params = jax.device_put(tuple(m.params for m in members))
      for batch in batches:
        if (configs, batch) not in self._futures:
          future = self._executor.submit(self._compile, configs, params, batch)
          self._futures[configs, batch] = future
          queued += 1
    logging.info("latency: compiling %d programs on a background thread", queued)

  def get(self, configs: Sequence[ModelConfig], params, batch: int):
    """The compiled ``(params, images [batch, H, W, C]) -> F_k`` of ``configs``."""
    key = (tuple(configs), batch)
    if key not in self._futures:
      future = concurrent.futures.Future()
      future.set_result(self._compile(key[0], params, batch))
      self._futures[key] = future
    return self._futures[key].result()

  def close(self) -> None:
    """Drops queued compiles that have not started (e.g. when the run failed)."""
    if self._executor is not None:
      self._executor.shutdown(wait=False, cancel_futures=True)
      self._executor = None


def latency_ms(
    programs: LatencyPrograms,
    configs: Sequence[ModelConfig],
    params: Sequence[Any],
    batch: int,
    repeats: int,
) -> float:
  """Median per-image ms of the summed forward of ``configs`` at ``batch``."""
  params = jax.device_put(tuple(params))
  forward = programs.get(tuple(configs), params, batch)
  images = jnp.zeros((batch, *programs.image_shape), jnp.float32)
  ms = report.compute_latency_ms(
      functools.partial(forward, params), images, repeats=repeats, warmup=2
  )
  return ms / batch


def build_rows(
    *,
    teacher,
    students: Sequence,
    baselines: Sequence,
    labels: np.ndarray,
    direct: Sequence = (),
    family: Sequence = (),
    image_shape: tuple[int, int, int],
    prefixes: bool,
    latency: bool,
    repeats: int,
    predictions: dict | None = None,
    programs: LatencyPrograms | None = None,
) -> list[report.Row]:
  """One row per model, per ensemble prefix (with ``prefixes``), per baseline, per
  ``direct`` model (chain mode: the deployed size distilled straight from the teacher)
  and per ``family`` model (``cnn_k``, ``mlp_k``: other families at student k's FLOPs).

  ``teacher``, ``students`` and ``baselines`` are trained models with
  ``name``, ``size``, ``config``, ``params`` and ``test_logits`` [N, K]
  (``pkd``'s ``stages.Trained``); ``labels`` the test labels [N]. ``predictions``, when
  given, receives each row's predicted class per test example (int [N], by row name).
  ``programs`` holds the latency programs (perhaps compiled ahead); by default they are
  compiled here.
  """
  teacher_pred = teacher.test_logits.argmax(-1)
  teacher_flops = flops.count_flops(teacher.config)
  if latency and programs is None:
    programs = LatencyPrograms(image_shape)

  def row(name, kind, size, members, logits):
    configs = [m.config for m in members]
    f = sum(flops.count_flops(c) for c in configs)
    b1 = b256 = None
    if predictions is not None:
      predictions[name] = logits.argmax(-1)
    if latency:
      params = [m.params for m in members]
      small, big = LATENCY_BATCHES
      b1 = latency_ms(programs, configs, params, small, repeats)
      b256 = latency_ms(programs, configs, params, big, max(3, repeats // 5))
    return report.Row(
        name=name,
        kind=kind,
        size=size,
        params=sum(flops.count_params(c) for c in configs),
        flops=f,
        pct_teacher_flops=100.0 * f / teacher_flops,
        accuracy=accuracy(logits, labels),
        agreement=float(np.mean(logits.argmax(-1) == teacher_pred)),
        latency_ms_b1=b1,
        latency_ms_b256=b256,
    )

  rows = [row("teacher", "teacher", "teacher", [teacher], teacher.test_logits)]
  for m in students:
    if m.config.connect_dim:
      continue  # a connected student is not a standalone classifier; see its prefix row
    rows.append(row(m.name, "student", m.size, [m], m.test_logits))
  if prefixes:
    cumulative = ensemble.cumulative([m.test_logits for m in students])
    for k, logits in enumerate(cumulative, start=1):
      sizes = "+".join(m.size for m in students[:k])
      rows.append(row(f"prefix_1..{k}", "prefix", sizes, students[:k], logits))
  for m in baselines:
    rows.append(row(m.name, "baseline", m.size, [m], m.test_logits))
  for m in direct:
    rows.append(row(m.name, "direct", m.size, [m], m.test_logits))
  for m in family:
    rows.append(row(m.name, "family", m.size, [m], m.test_logits))
  return rows


def pixel_baseline_row(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    teacher_flops: int,
    teacher_test_logits: np.ndarray,
) -> report.Row:
  """The sanity row: multinomial logistic regression on the pixels (``sanity``), fitted on
  the training rows, scored on test. A teacher that does not beat it learned nothing useful."""
  baseline = sanity.fit_pixel_baseline(x_train, y_train, num_classes)
  logits = baseline.logits(x_test)
  d = int(np.prod(x_test.shape[1:]))
  f = 2 * d * num_classes + num_classes
  return report.Row(
      name="pixel_baseline",
      kind="pixels",
      size="pixels",
      params=d * num_classes + num_classes,
      flops=f,
      pct_teacher_flops=100.0 * f / teacher_flops,
      accuracy=accuracy(logits, y_test),
      agreement=float(np.mean(logits.argmax(-1) == teacher_test_logits.argmax(-1))),
  )
