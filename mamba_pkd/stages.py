"""The stages of a PKD run: its context, training or restoring one model, its predictions.

* :class:`RunContext`: what every stage of a run reads (config, settings,
  dataset and its held-out split, the size ladder, the students' view pool,
  the workdir); built once by :func:`create_context`, never changed after.
* :func:`run_stage`: trains one model (or restores it when its final
  checkpoint exists) and predicts the training and test sets with it,
  returning a :class:`Trained`.
* :class:`PoolTables`: the frozen models' outputs on the rows a student
  stage indexes (the view pool's, computed once per model and only when a
  stage trains; restoring finished stages never runs the models over the pool).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

from mamba_pkd import checkpoints, ensemble, evaluate, flops, manifest, parallel, provenance
from mamba_pkd import settings, train
from mamba_pkd import data as data_lib
from mamba_pkd.metrics import MetricsWriter
from mamba_pkd.models import ModelConfig, feature_width, param_shapes
from mamba_pkd.ladders import family_sizes, ladder_configs

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What the stages of one run read; built by :func:`create_context`.

  Attributes:
    config: the run's ConfigDict.
    settings: validated ``config.pkd``.
    teacher_optim, student_optim: validated optimiser settings.
    workdir: the run directory.
    is_writer: whether this process writes files (process 0).
    dataset: the loaded dataset.
    train_index, val_index: rows of ``x_train`` used for training / held out.
    sizes: the ladder's ModelConfigs by size name (``"teacher"``, ``"s1"``, ...), and the
      CNN and MLP configs at the same FLOPs (``"cnn_s1"``, ``"mlp_s1"``, ...).
    views: uint8 [V, n_train, H, W, C], the students' fixed augmented views,
      or None (``student.cached_views`` 0 or no augmentation).
    metrics: the run's metrics writer.
    data_identity: the dataset's identity in stage fingerprints (name, npz hash, split).
    retrain_changed: retrain stages whose fingerprint differs (and, through their hashes,
      every stage after them) instead of stopping.
  """

  config: ml_collections.ConfigDict
  settings: settings.PKDSettings
  teacher_optim: train.OptimConfig
  student_optim: train.OptimConfig
  workdir: pathlib.Path
  is_writer: bool
  dataset: data_lib.Dataset
  train_index: np.ndarray
  val_index: np.ndarray
  sizes: Mapping[str, ModelConfig]
  views: np.ndarray | None
  metrics: MetricsWriter
  data_identity: Mapping[str, Any]
  retrain_changed: bool = False

  @property
  def val_labels(self) -> np.ndarray:
    return self.dataset.y_train[self.val_index]


def _check_writable(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_test"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(
        f"workdir {str(workdir)!r} is not writable ({e.strerror}); pass a "
        "directory you can write to with --workdir"
    ) from None


def _student_views(config: ml_collections.ConfigDict, images: np.ndarray) -> np.ndarray | None:
  """The students' view pool (a function of the seed only, so a resumed run rebuilds it)."""
  num_views = int(config.student.get("cached_views", 0))
  if num_views < 1 or config.student.augment == "none":
    return None
  t0 = time.time()
  views = data_lib.augmented_views(images, num_views, config.student.augment, config.seed)
  logging.info(
      "student views: %d %s views of %d training images (%.1f MB) in %.1fs",
      num_views,
      config.student.augment,
      len(images),
      views.nbytes / 1e6,
      time.time() - t0,
  )
  return views


def create_context(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, retrain_changed: bool = False
) -> RunContext:
  """Validates the config, loads the data, carves the held-out split, builds the view pool.

  Raises:
    ValueError: a bad config field, an unwritable workdir or a held-out split
      as large as the training set (one line naming the value).
  """
  parsed = settings.validate_config(config)
  workdir = pathlib.Path(workdir)
  is_writer = parallel.is_writer()
  if is_writer:
    _check_writable(workdir)
  dataset = data_lib.load_dataset(
      config.dataset, data_dir=config.data_dir or None, seed=config.seed
  )
  n_all = dataset.num_train
  if config.validation_size >= n_all:
    raise ValueError(
        f"validation_size={config.validation_size} must be smaller than the "
        f"{n_all} training examples"
    )
  order = np.random.default_rng(config.seed).permutation(n_all)
  val_index = np.sort(order[: config.validation_size])
  train_index = np.sort(order[config.validation_size :])
  sizes = ladder_configs(
      config.model.ladder,
      image_shape=dataset.image_shape,
      num_classes=dataset.num_classes,
      scan_method=config.model.scan_method,
      bidirectional=config.model.bidirectional,
  )
  sizes = {**sizes, **family_sizes(sizes)}  # cnn_<s>, mlp_<s> at the Mamba rungs' FLOPs
  logging.info(
      "dataset %s: %d train (%d for training, %d held out), %d test, %s, %d classes",
      dataset.name,
      n_all,
      len(train_index),
      len(val_index),
      dataset.num_test,
      dataset.image_shape,
      dataset.num_classes,
  )
  return RunContext(
      config=config,
      settings=parsed["settings"],
      teacher_optim=parsed["teacher_optim"],
      student_optim=parsed["student_optim"],
      workdir=workdir,
      is_writer=is_writer,
      dataset=dataset,
      train_index=train_index,
      val_index=val_index,
      sizes=sizes,
      views=_student_views(config, dataset.x_train[train_index]),
      metrics=MetricsWriter(workdir, enabled=is_writer),
      data_identity=provenance.data_identity(
          config.dataset,
          seed=config.seed,
          num_train=len(train_index),
          num_heldout=len(val_index),
          num_test=dataset.num_test,
      ),
      retrain_changed=retrain_changed,
  )


def write_config(ctx: RunContext) -> None:
  """``<workdir>/config.json``: this run's config, written when the run first trains a stage
  and at its end, so it always describes the checkpoints (a run that stops at a changed
  stage leaves the old one; ``config_history.jsonl`` has every run's config)."""
  if ctx.is_writer:
    (ctx.workdir / "config.json").write_text(
        ctx.config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    )


def stage_fingerprint(
    ctx: RunContext,
    *,
    model_config: ModelConfig,
    sections: Mapping[str, Any],
    optim: train.OptimConfig,
    seed: int,
    frozen: Mapping[str, str] | None = None,
) -> dict:
  """The fingerprint of a stage (:mod:`mamba_pkd.provenance`): data, model, the config
  sections it learned with, steps, seed and the hashes of the frozen models it read."""
  steps = train.stage_steps(len(ctx.train_index), optim.batch_size, optim.epochs, optim.min_steps)
  model = manifest.config_record(model_config)
  if not model.get("connect_dim"):
    model.pop("token_features", None)  # what it hands on does not change how it trains
  return provenance.stage_fingerprint(
      provenance.stage_fields(
          data=ctx.data_identity,
          model=model,
          sections=sections,
          steps=steps,
          seed=seed,
          frozen=frozen,
      )
  )


LOSS_FIELDS = ("mode", "target", "loss", "alpha", "temperature", "connect")  # of config.pkd


def learned_sections(ctx: RunContext, kind: str) -> dict:
  """The config a stage of ``kind`` learns from, for its fingerprint: the optimiser,
  schedule and augmentation section, and the loss (``config.pkd``'s loss fields for
  distilled students, cross-entropy for the teacher and the baselines)."""
  if kind == "teacher":
    return {**provenance.config_sections(ctx.config, "teacher"), "loss": "cross_entropy"}
  sections = provenance.config_sections(ctx.config, "student")
  if kind == "baseline":
    return {**sections, "loss": "cross_entropy"}
  return {**sections, "pkd": {k: ctx.config.pkd[k] for k in LOSS_FIELDS}}


@dataclasses.dataclass(frozen=True)
class Trained:
  """A finished stage's model and its predictions (host arrays).

  Attributes:
    name: its name in the run (``"teacher"``, ``"student_2"``, ``"baseline_1"``).
    stage: its checkpoint stage (``ckpt/<stage>``).
    size: ladder size name.
    config: its ModelConfig.
    params: its parameters (``weight`` folded into the head).
    weight: its ensemble weight ``eta`` (1 unless the ensemble weighted it).
    prefix_scale: the calibration scale of the prefix ending with it (1: none).
    info: what the stage recorded (size, seed, the weak-learner decision).
    train_logits, train_features: outputs on every row of ``x_train``.
    test_logits, test_features: outputs on the test split.
  """

  name: str
  stage: str
  size: str
  config: ModelConfig
  params: PyTree
  train_logits: np.ndarray  # [N_train_all, K]
  train_features: np.ndarray  # [N_train_all, d]
  test_logits: np.ndarray  # [N_test, K]
  test_features: np.ndarray  # [N_test, d]
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  weight: float = 1.0
  prefix_scale: float = 1.0
  fingerprint: str = ""  # the hash of the stage that trained it

  def weighted(self, weight: float) -> "Trained":
    """This model as an ensemble member of weight ``weight`` (folded into its head and logits)."""
    if weight == 1.0:
      return dataclasses.replace(self, weight=1.0)
    w = np.float32(weight)
    return dataclasses.replace(
        self,
        params=ensemble.fold_weight(self.params, weight),
        train_logits=self.train_logits * w,
        test_logits=self.test_logits * w,
        weight=float(weight),
    )

  def as_member(self) -> ensemble.Member:
    """The :class:`mamba_pkd.ensemble.Member` record of this model (for the manifest)."""
    return ensemble.Member(
        name=self.name,
        stage=self.stage,
        size=self.size,
        flops=flops.count_flops(self.config),
        num_params=flops.count_params(self.config),
        d_model=feature_width(self.config),
        connect_dim=self.config.connect_dim,
        weight=self.weight,
        prefix_scale=self.prefix_scale,
        config=self.config,
        params=self.params,
    )


class PoolTables:
  """Frozen models' outputs on the rows that student stages index.

  The view pool's rows when the run has a pool (each model's outputs computed
  once, on first request; ``prev`` supplies the features a connected model
  reads), else the rows of ``x_train``. Owned by one run's loop.
  """

  def __init__(self, ctx: RunContext):
    self._ctx = ctx
    self._outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def logits(self, model: Trained, prev: Trained | None = None) -> np.ndarray:
    """Logits [R, K] of ``model`` on the indexed rows (weight included)."""
    return self._of(model, prev)[0]

  def features(self, model: Trained, prev: Trained | None = None) -> np.ndarray:
    """Features [R, d] of ``model`` on the indexed rows (``models.feature_width``)."""
    return self._of(model, prev)[1]

  def _of(self, model: Trained, prev: Trained | None) -> tuple[np.ndarray, np.ndarray]:
    ctx = self._ctx
    if ctx.views is None:
      return model.train_logits, model.train_features
    if model.name not in self._outputs:
      t0 = time.time()
      prev_features = self.features(prev) if model.config.connect_dim else None
      self._outputs[model.name] = evaluate.predict_dataset(
          model.config,
          model.params,
          ctx.views.reshape((-1,) + ctx.views.shape[2:]),
          mean=ctx.dataset.mean,
          std=ctx.dataset.std,
          batch_size=ctx.config.eval_batch_size,
          prev_features=prev_features,
      )
      logging.info(
          "%s: outputs on the %d pooled views in %.1fs",
          model.name,
          len(self._outputs[model.name][0]),
          time.time() - t0,
      )
    return self._outputs[model.name]


def run_stage(
    ctx: RunContext,
    name: str,
    size: str,
    model_config: ModelConfig,
    stage_loss,
    optim: train.OptimConfig,
    *,
    seed: int,
    augment: str,
    tables: Callable[[], Mapping[str, np.ndarray]] | None = None,
    spec: train.FrozenSpec = train.FrozenSpec(),
    frozen: train.Frozen = train.Frozen(),
    prev: Trained | None = None,
    views: np.ndarray | None = None,
    kind: str,
    frozen_hashes: Mapping[str, str] | None = None,
    weighting: Mapping[str, Any] | None = None,
) -> Trained:
  """Trains (or restores, if complete) one stage and predicts the train and test sets.

  The stage's fingerprint (:func:`stage_fingerprint` of ``model_config``, ``optim``,
  ``seed``, the config sections a stage of ``kind`` learns from,
  :func:`learned_sections`, and ``frozen_hashes``, the fingerprints of the frozen
  models it reads by role) is compared with the one stored with the stage before
  anything is restored or resumed: a difference stops the run with one line naming the
  fields (:class:`mamba_pkd.provenance.ChangedStageError`), or with
  ``ctx.retrain_changed`` moves the stage aside (``ckpt/.replaced/``) and trains it again.

  ``views`` (the student pool) makes ``tables`` index the pool's rows.
  ``tables`` returns the frozen models' cached outputs; it is called only
  when the stage has to be trained, so restoring a finished stage never runs
  the frozen models over the pool. ``prev`` is the member whose features a
  connected model reads. ``weighting`` says how ``tables``' ``example_weight`` column
  was made (recorded in the fingerprint; None: no weights, every example counts the same).
  """
  directory = checkpoints.stage_dir(ctx.workdir, name)
  sections = learned_sections(ctx, kind)
  if weighting:
    sections = {**sections, "example_weights": dict(weighting)}
  fingerprint = stage_fingerprint(
      ctx,
      model_config=model_config,
      sections=sections,
      optim=optim,
      seed=seed,
      frozen=frozen_hashes,
  )
  keep = provenance.check_stage(
      name,
      provenance.read_fingerprint(directory),
      fingerprint,
      retrain_changed=ctx.retrain_changed,
  )
  if not keep:
    _set_aside(ctx, directory)
  ckpt = checkpoints.StageCheckpointer(directory, is_writer=ctx.is_writer)
  if parallel.agree(ckpt.is_complete(), f"stage {name} is complete"):
    # Shapes and dtypes only: nothing is computed or compiled to restore a stage.
    template = param_shapes(model_config)
    params, info = ckpt.load_final(template)
    logging.info("stage %s: already complete, not retrained", name)
  else:
    write_config(ctx)
    if ctx.is_writer:
      provenance.write_fingerprint(directory, fingerprint)
    data = train.StageData(
        ctx.dataset,
        ctx.train_index,
        augment=augment,
        cached=tables() if tables is not None else None,
        views=views,
    )
    live = not data.uses_cache  # frozen models run inside the step
    params = train.train_stage(
        name=name,
        model_config=model_config,
        stage_loss=stage_loss,
        optim=optim,
        data=data,
        seed=seed,
        spec=spec if live else train.FrozenSpec(),
        frozen=frozen if live else train.Frozen(),
        checkpointer=ckpt,
        checkpoint_every=ctx.config.checkpoint_every,
        metrics_writer=ctx.metrics,
        log_every=ctx.config.log_every,
    )
    info = {"size": size, "seed": seed}
    ckpt.mark_complete(params, info)
    parallel.sync(f"stage {name} saved")  # process 0 has written it before anyone reads
  ckpt.close()
  trained = predict(ctx, name, size, model_config, params, info, prev=prev)
  return dataclasses.replace(trained, fingerprint=fingerprint["hash"])


def _set_aside(ctx: RunContext, directory: pathlib.Path) -> None:
  """Moves a changed stage's checkpoints to ``ckpt/.replaced/<stage>-<time>`` (kept, not used)."""
  if ctx.is_writer and directory.exists():
    target = directory.parent / ".replaced" / f"{directory.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(directory), str(target))
    logging.warning(
        "stage %s changed: its old checkpoints moved to %s; retraining", directory.name, target
    )
  parallel.sync(f"stage {directory.name} set aside")


def predict(
    ctx: RunContext,
    name: str,
    size: str,
    model_config: ModelConfig,
    params: PyTree,
    info: Mapping[str, Any],
    prev: Trained | None = None,
) -> Trained:
  """A :class:`Trained` with the model's outputs on the training and test sets."""
  ds = ctx.dataset
  kw = dict(mean=ds.mean, std=ds.std, batch_size=ctx.config.eval_batch_size)
  rep = parallel.replicate(params)
  connected = prev is not None and model_config.connect_dim
  prev_train = prev.train_features if connected else None
  prev_test = prev.test_features if connected else None
  tr_logits, tr_feats = evaluate.predict_dataset(
      model_config, params, ds.x_train, prev_features=prev_train, replicated_params=rep, **kw
  )
  te_logits, te_feats = evaluate.predict_dataset(
      model_config, params, ds.x_test, prev_features=prev_test, replicated_params=rep, **kw
  )
  return Trained(
      name=name,
      stage=name,
      size=size,
      config=model_config,
      params=params,
      train_logits=tr_logits,
      train_features=tr_feats,
      test_logits=te_logits,
      test_features=te_feats,
      info=dict(info),
  )
