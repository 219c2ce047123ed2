"""Progressive knowledge distillation: the teacher, then students, then the report.

Notation (paper -> code):

=================  ==================  ======================================
symbol             name                meaning
=================  ==================  ======================================
``g(x)``           teacher logits      frozen teacher, trained first with CE
``f_k(x)``         student k logits    the k-th accepted student
``F_k(x)``         prefix k logits     ``sum_{j<=k} eta_j f_j(x)``
``eta_k``          weight              student k's ensemble weight (folded into its head)
``a``, ``T``       alpha, temperature  ``L = a*CE(y, F_k) + (1-a)*T^2*KL(g/T || F_k/T)``
``gamma_k``        edge                B-DISTIL weak-learner edge on held-out data
=================  ==================  ======================================

Modes:

* ``ensemble`` (default): student k is trained either on the teacher alone
  (``target="teacher"``, the default: every student distils the teacher, and
  its weight ``eta_k`` is a line search on held-out data, the step of gradient
  boosting) or on the residual ``stop_gradient(F_{k-1}) + f_k``
  (``target="residual"``, B-DISTIL's formulation, ``eta_k = 1``). It is
  *accepted as a weak learner* when the held-out fit of the ensemble to the
  teacher improves (``accept="fit"``: soft KL to the teacher drops by at
  least ``margin``; with ``target="teacher"`` both fits are taken at the best
  overall scale of the logits, since a sum of independent students is only
  meaningful up to scale) or its edge is at least ``gamma``
  (``accept="edge"``), without losing more than ``max_accuracy_drop`` of
  held-out accuracy. A rejected candidate is retrained
  once with another seed (``reseeds``), then the next larger size on the
  ladder is tried. Each accepted student moves one rung up the ladder. The loop
  stops at ``max_students``, at the FLOPs budget, when the ladder is exhausted,
  or when the ensemble's held-out accuracy is within ``epsilon`` of the
  teacher's. Any prefix of the ensemble is a classifier (anytime inference).
* ``chain`` (teacher assistants): teacher -> student 1 -> student 2 ..., each
  distilled from the previous frozen model, sizes in decreasing FLOPs order.

Everything pure (acceptance, prefix sums, fit) is a function of arrays;
:func:`train_and_evaluate` holds the state: data, stages, checkpoints, report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mamba_pkd import checkpoints, flops, losses, parallel, report, train
from mamba_pkd import data as data_lib
from mamba_pkd.models import ModelConfig, init_params, ladder_configs, scale_head, LADDERS

MODES = ("ensemble", "chain")
TARGETS = ("teacher", "residual")
STAGE_LOSSES = ("kd", "bdistil")
ACCEPT_RULES = ("fit", "edge")


# ----------------------------------------------------------------------------
# Settings, validated before any expensive work.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PKDSettings:
  """The distillation settings of a run (see the module docstring)."""

  mode: str = "ensemble"
  target: str = "teacher"
  ladder: tuple[str, ...] = ("s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8")
  max_students: int = 7
  flops_budget_pct: float = 100.0
  epsilon: float = -1.0
  alpha: float = 0.5
  temperature: float = 4.0
  loss: str = "kd"
  accept: str = "fit"
  margin: float = 0.0
  gamma: float = 0.0
  max_accuracy_drop: float = 0.005
  reseeds: int = 1
  connect: bool = False


def _choice(value: Any, valid: Sequence[str], field: str) -> None:
  if value not in valid:
    raise ValueError(f"{field}={value!r} is not valid; choose one of {tuple(valid)}")


def settings_from_config(config: ml_collections.ConfigDict) -> PKDSettings:
  """Reads and validates ``config.pkd``; raises ValueError naming the bad field."""
  p = config.pkd
  s = PKDSettings(
      mode=p.mode,
      target=p.get("target", "teacher"),
      ladder=tuple(p.ladder),
      max_students=p.max_students,
      flops_budget_pct=p.flops_budget_pct,
      epsilon=p.epsilon,
      alpha=p.alpha,
      temperature=p.temperature,
      loss=p.loss,
      accept=p.accept,
      margin=p.margin,
      gamma=p.gamma,
      max_accuracy_drop=p.max_accuracy_drop,
      reseeds=p.reseeds,
      connect=p.connect,
  )
  _choice(s.mode, MODES, "pkd.mode")
  _choice(s.target, TARGETS, "pkd.target")
  if s.loss == "bdistil" and s.target != "residual":
    raise ValueError(
        "pkd.loss='bdistil' fits the residual of the ensemble: it needs "
        f"pkd.target='residual', got pkd.target={s.target!r}"
    )
  _choice(s.loss, STAGE_LOSSES, "pkd.loss")
  _choice(s.accept, ACCEPT_RULES, "pkd.accept")
  if not s.ladder:
    raise ValueError("pkd.ladder is empty; give at least one size name, e.g. ('s1', 's2')")
  if not isinstance(s.max_students, int) or s.max_students < 1:
    raise ValueError(f"pkd.max_students must be an int >= 1, got {s.max_students!r}")
  if not 0.0 <= s.alpha <= 1.0:
    raise ValueError(f"pkd.alpha must be in [0, 1], got {s.alpha}")
  if not s.temperature > 0:
    raise ValueError(f"pkd.temperature must be > 0, got {s.temperature}")
  if not s.flops_budget_pct > 0:
    raise ValueError(f"pkd.flops_budget_pct must be > 0, got {s.flops_budget_pct}")
  if s.reseeds < 0:
    raise ValueError(f"pkd.reseeds must be >= 0, got {s.reseeds}")
  if not 0 <= s.max_accuracy_drop <= 1:
    raise ValueError(f"pkd.max_accuracy_drop must be in [0, 1], got {s.max_accuracy_drop}")
  return s


def optim_from_config(stage: ml_collections.ConfigDict, name: str) -> train.OptimConfig:
  """``config.teacher`` / ``config.student`` -> OptimConfig (errors name the field)."""
  try:
    return train.OptimConfig(
        learning_rate=stage.learning_rate,
        weight_decay=stage.weight_decay,
        warmup_fraction=stage.warmup_fraction,
        epochs=stage.epochs,
        batch_size=stage.batch_size,
        grad_clip=stage.grad_clip,
    )
  except ValueError as e:
    raise ValueError(f"{name}.{e}") from None


def validate_config(config: ml_collections.ConfigDict) -> dict:
  """Checks everything that can be checked without data; returns parsed pieces."""
  settings = settings_from_config(config)
  teacher_optim = optim_from_config(config.teacher, "teacher")
  student_optim = optim_from_config(config.student, "student")
  _choice(config.teacher.augment, data_lib.AUGMENTATIONS, "teacher.augment")
  _choice(config.student.augment, data_lib.AUGMENTATIONS, "student.augment")
  views = config.student.get("cached_views", 0)
  if isinstance(views, bool) or not isinstance(views, int) or views < 0:
    raise ValueError(f"student.cached_views must be an int >= 0 (0: augment live), got {views!r}")
  if views > 1 and config.student.augment == "none":
    raise ValueError(
        f"student.cached_views={views} needs an augmentation to draw the views "
        "from: set student.augment to 'shift', 'crop_flip' or 'affine', or "
        "cached_views to 0"
    )
  if config.model.ladder not in LADDERS:
    raise ValueError(
        f"model.ladder={config.model.ladder!r} is not valid; choose one of "
        f"{tuple(sorted(LADDERS))}"
    )
  sizes = LADDERS[config.model.ladder]["sizes"]
  unknown = [s for s in settings.ladder if s not in sizes or s == "teacher"]
  if unknown:
    raise ValueError(
        f"pkd.ladder has unknown size(s) {unknown}; valid sizes of ladder "
        f"{config.model.ladder!r}: {[s for s in sizes if s != 'teacher']}"
    )
  if config.validation_size < 1:
    raise ValueError(f"validation_size must be >= 1, got {config.validation_size}")
  for field in ("teacher", "student"):
    parallel.check_batch_divisible(config[field].batch_size, f"{field}.batch_size")
  parallel.check_batch_divisible(config.eval_batch_size, "eval_batch_size")
  return dict(settings=settings, teacher_optim=teacher_optim, student_optim=student_optim)


# ----------------------------------------------------------------------------
# Pure pieces of the algorithm.
# ----------------------------------------------------------------------------


def prefix_sums(student_logits: Sequence[np.ndarray]) -> list[np.ndarray]:
  """``[f_1, f_2, ...] -> [F_1, F_2, ...]`` with ``F_k = sum_{j<=k} f_j`` ([N, K] each)."""
  return list(np.cumsum(np.stack(student_logits), axis=0)) if student_logits else []


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def teacher_fit(
    teacher_logits: np.ndarray, ensemble_logits: np.ndarray, temperature: float
) -> float:
  """Held-out ``T^2 * KL(softmax(g/T) || softmax(F/T))`` (lower = closer to the teacher)."""
  return float(
      losses.soft_kl(jnp.asarray(ensemble_logits), jnp.asarray(teacher_logits), temperature)
  )


# Grids of the line search (numpy, on held-out logits). Both contain 1 exactly.
FIT_SCALES = np.geomspace(0.01, 10.0, 61)  # overall scale c of F
WEIGHTS = np.concatenate([[0.0], np.geomspace(1 / 16, 16, 41)])  # eta_k of the new student


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def calibrated_fit(
    teacher_logits: np.ndarray,
    ensemble_logits: np.ndarray,
    temperature: float,
    scales: np.ndarray = FIT_SCALES,
) -> tuple[float, float]:
  """``min_c T^2 KL(softmax(g/T) || softmax(c F/T))`` over ``scales``, and the best ``c``.

  The fit of an ensemble up to the overall scale of its logits (argmax, hence
  accuracy, does not depend on that scale). ``teacher_logits`` and
  ``ensemble_logits`` are [N, K].
  """
  t = float(temperature)
  log_p = _log_softmax(np.asarray(teacher_logits, np.float64) / t)  # [N, K]
  f = np.asarray(ensemble_logits, np.float64)
  kl = (
      np.array(
          [np.mean(np.sum(np.exp(log_p) * (log_p - _log_softmax(c * f / t)), -1)) for c in scales]
      )
      * t
      * t
  )  # [S]
  best = int(np.argmin(kl))
  return float(kl[best]), float(scales[best])


def line_search(
    teacher_logits: np.ndarray,
    prefix_logits: np.ndarray,
    candidate_logits: np.ndarray,
    temperature: float,
    weights: np.ndarray = WEIGHTS,
) -> tuple[float, float, float]:
  """The weight ``eta`` of a new student: ``argmin_eta calibrated_fit(g, F + eta f)``.

  Returns:
    ``(eta, c, fit)``: the best weight in ``weights`` (0 when no weight
    improves the fit), the overall scale and the fit it reaches.
  """
  best = None
  for eta in weights:
    fit, c = calibrated_fit(teacher_logits, prefix_logits + eta * candidate_logits, temperature)
    if best is None or fit < best[2]:
      best = (float(eta), c, fit)
  return best


@dataclasses.dataclass(frozen=True)
class Decision:
  """The weak-learner test of one candidate, on held-out data.

  ``weight`` is the candidate's ensemble weight ``eta_k`` (1 for
  ``target="residual"`` and for the first student) and ``scale`` the overall
  scale ``c`` of the logits at which ``fit_after`` is measured (1 when the fit
  is not calibrated).
  """

  accepted: bool
  reason: str
  fit_before: float
  fit_after: float
  edge: float
  accuracy_before: float
  accuracy_after: float
  weight: float = 1.0
  scale: float = 1.0


def weak_learner_decision(
    *,
    teacher: np.ndarray,
    prefix: np.ndarray | None,
    candidate: np.ndarray,
    labels: np.ndarray,
    settings: PKDSettings,
) -> Decision:
  """Accepts or rejects a candidate f_k given held-out logits ([N, K] each).

  ``prefix`` is F_{k-1} (None for the first student, i.e. all-zero logits).
  With ``settings.target == "teacher"`` the candidate enters the ensemble as
  ``F_{k-1} + eta f_k`` with ``eta`` from :func:`line_search` (the first
  student with ``eta = 1``) and fits are calibrated (:func:`calibrated_fit`);
  with ``"residual"`` as ``F_{k-1} + f_k`` with plain fits (:func:`teacher_fit`).
  """
  before = np.zeros_like(candidate) if prefix is None else prefix
  weight, scale = 1.0, 1.0
  if settings.target == "teacher":
    fit_before, _ = calibrated_fit(teacher, before, settings.temperature)
    if prefix is None:
      fit_after, scale = calibrated_fit(teacher, candidate, settings.temperature)
    else:
      weight, scale, fit_after = line_search(teacher, before, candidate, settings.temperature)
  else:
    fit_before = teacher_fit(teacher, before, settings.temperature)
    fit_after = teacher_fit(teacher, before + candidate, settings.temperature)
  after = before + weight * candidate
  k_plus, k_minus = losses.adversary_weights(jnp.asarray(teacher), jnp.asarray(before))
  edge = float(losses.weak_learner_edge(jnp.asarray(weight * candidate), k_plus, k_minus))
  acc_before = accuracy(before, labels) if prefix is not None else 0.0
  acc_after = accuracy(after, labels)
  searched = settings.target == "teacher" and prefix is not None  # eta came from line_search
  at_weight = f" at weight {weight:.3g}" if searched else ""
  if settings.accept == "fit":
    improves = fit_after <= fit_before - settings.margin
    why = (
        f"held-out fit to teacher{' (calibrated)' if searched else ''} {fit_before:.4f} -> "
        f"{fit_after:.4f}{at_weight} (needs a drop of at least {settings.margin})"
    )
  else:
    improves = edge >= settings.gamma
    why = f"edge {edge:.4f} (needs >= {settings.gamma}){at_weight}"
  improves = improves and weight > 0  # a searched weight of 0 leaves the ensemble as it was
  keeps_accuracy = acc_after >= acc_before - settings.max_accuracy_drop
  if not keeps_accuracy:
    why += (
        f"; held-out accuracy {acc_before:.4f} -> {acc_after:.4f} falls more than "
        f"{settings.max_accuracy_drop}"
    )
  return Decision(
      accepted=bool(improves and keeps_accuracy),
      reason=why,
      fit_before=fit_before,
      fit_after=fit_after,
      edge=edge,
      accuracy_before=acc_before,
      accuracy_after=acc_after,
      weight=weight,
      scale=scale,
  )


def stage_loss_for(settings: PKDSettings, *, first: bool) -> losses.StageLoss:
  """The loss of an ensemble/chain student stage, as a composition."""
  if settings.mode == "chain":
    return losses.kd(settings.alpha, settings.temperature, view="student", target="previous")
  base = None if first or settings.target == "teacher" else "prefix"
  view = losses.residual("student", base=base)
  if settings.loss == "bdistil":
    return losses.bdistil(view="student", target="teacher", base=base)
  return losses.kd(settings.alpha, settings.temperature, view=view, target="teacher")


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Member:
  """A trained model and its predictions (host arrays)."""

  name: str
  size: str
  config: ModelConfig
  params: Any
  train_logits: np.ndarray  # [N_train_all, K]
  train_features: np.ndarray  # [N_train_all, d]
  test_logits: np.ndarray  # [N_test, K]
  test_features: np.ndarray  # [N_test, d]
  info: dict = dataclasses.field(default_factory=dict)
  pool_logits: np.ndarray | None = None  # [V * n_train, K] on Run.views, when computed
  pool_features: np.ndarray | None = None  # [V * n_train, d]

  def scaled(self, weight: float) -> "Member":
    """This member with its logits multiplied by ``weight`` (folded into its head)."""
    if weight == 1.0:
      return self
    times = lambda a: None if a is None else a * np.float32(weight)
    return dataclasses.replace(
        self,
        params=scale_head(self.params, weight),
        train_logits=times(self.train_logits),
        test_logits=times(self.test_logits),
        pool_logits=times(self.pool_logits),
    )


class Run:
  """State of one PKD run: dataset, splits, workdir, writer, stage bookkeeping."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    self.parsed = validate_config(config)
    self.config = config
    self.settings: PKDSettings = self.parsed["settings"]
    self.workdir = pathlib.Path(workdir)
    self.writer_process = parallel.is_writer()
    if self.writer_process:
      _check_writable(self.workdir)
    self.dataset = data_lib.load_dataset(
        config.dataset, data_dir=config.data_dir or None, seed=config.seed
    )
    n_all = self.dataset.num_train
    if config.validation_size >= n_all:
      raise ValueError(
          f"validation_size={config.validation_size} must be smaller than the "
          f"{n_all} training examples"
      )
    order = np.random.default_rng(config.seed).permutation(n_all)
    self.val_index = np.sort(order[: config.validation_size])
    self.train_index = np.sort(order[config.validation_size :])
    self.sizes = ladder_configs(
        config.model.ladder,
        image_shape=self.dataset.image_shape,
        num_classes=self.dataset.num_classes,
        scan_method=config.model.scan_method,
        bidirectional=config.model.bidirectional,
    )
    self.num_views = int(config.student.get("cached_views", 0))
    self._views = None
    self.metrics = train.MetricsWriter(self.workdir, enabled=self.writer_process)
    if self.writer_process:
      (self.workdir / "config.json").write_text(
          config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
      )
    logging.info(
        "dataset %s: %d train (%d for training, %d held out), %d test, %s, %d classes",
        self.dataset.name,
        n_all,
        len(self.train_index),
        len(self.val_index),
        self.dataset.num_test,
        self.dataset.image_shape,
        self.dataset.num_classes,
    )

  # -- the students' view pool ---------------------------------------------

  @property
  def views(self) -> np.ndarray | None:
    """uint8 [V, n_train, H, W, C]: the students' fixed augmented views, or None.

    Built on first use (``student.cached_views`` >= 1 with an augmentation),
    a function of the seed only, so a resumed run rebuilds the same pool.
    """
    if self.num_views < 1 or self.config.student.augment == "none":
      return None
    if self._views is None:
      t0 = time.time()
      self._views = data_lib.augmented_views(
          self.dataset.x_train[self.train_index],
          self.num_views,
          self.config.student.augment,
          self.config.seed,
      )
      logging.info(
          "student views: %d %s views of %d training images (%.1f MB) in %.1fs",
          self.num_views,
          self.config.student.augment,
          len(self.train_index),
          self._views.nbytes / 1e6,
          time.time() - t0,
      )
    return self._views

  def table(self, member: Member, prev: Member | None = None, features: bool = False) -> np.ndarray:
    """A frozen member's outputs on the rows that student stages index.

    The pool's rows when there is a view pool (computed once per member,
    ``prev`` supplies the features a connected member reads), else the rows
    of ``x_train``. Returns logits [R, K] or, with ``features``, [R, d].
    """
    if self.views is None:
      return member.train_features if features else member.train_logits
    if member.pool_logits is None:
      t0 = time.time()
      prev_features = None
      if member.config.connect_dim:
        prev_features = self.table(prev, features=True)
      ds = self.dataset
      member.pool_logits, member.pool_features = train.predict_dataset(
          member.config,
          member.params,
          self.views.reshape((-1,) + self.views.shape[2:]),
          mean=ds.mean,
          std=ds.std,
          batch_size=self.config.eval_batch_size,
          prev_features=prev_features,
      )
      logging.info(
          "%s: outputs on the %d pooled views in %.1fs",
          member.name,
          len(member.pool_logits),
          time.time() - t0,
      )
    return member.pool_features if features else member.pool_logits

  # -- stages ---------------------------------------------------------------

  def stage(
      self,
      name: str,
      size: str,
      model_config: ModelConfig,
      stage_loss,
      optim,
      *,
      seed: int,
      augment: str,
      cached: Callable[[], Mapping[str, np.ndarray]] | None = None,
      spec: train.FrozenSpec = train.FrozenSpec(),
      frozen: train.Frozen = train.Frozen(),
      prev: "Member | None" = None,
      views: np.ndarray | None = None,
  ) -> Member:
    """Trains (or restores, if complete) one stage and predicts train and test sets.

    ``views`` (the student pool) makes ``cached`` index the pool's rows.
    ``cached`` is a zero-argument function returning the tables: it is
    called only when the stage has to be trained, so restoring a finished
    stage never runs the frozen models over the pool.
    """
    ckpt = checkpoints.StageCheckpointer(
        checkpoints.stage_dir(self.workdir, name), is_writer=self.writer_process
    )
    if parallel.agree(ckpt.is_complete(), f"stage {name} is complete"):
      # Shapes and dtypes only: nothing is computed or compiled to restore a stage.
      template = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
      params, info = ckpt.load_final(template)
      logging.info("stage %s: already complete, not retrained", name)
    else:
      data = train.StageData(
          self.dataset,
          self.train_index,
          augment=augment,
          cached=cached() if cached is not None else None,
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
          checkpoint_every=self.config.checkpoint_every,
          metrics_writer=self.metrics,
          log_every=self.config.log_every,
      )
      info = {"size": size, "seed": seed}
      ckpt.mark_complete(params, info)
      parallel.sync(f"stage {name} saved")  # process 0 has written it before anyone reads
    ckpt.close()
    return self.predict(name, size, model_config, params, info, prev=prev)

  def predict(self, name, size, model_config, params, info, prev: Member | None = None) -> Member:
    ds = self.dataset
    kw = dict(mean=ds.mean, std=ds.std, batch_size=self.config.eval_batch_size)
    rep = parallel.replicate(params)
    prev_train = prev.train_features if (prev is not None and model_config.connect_dim) else None
    prev_test = prev.test_features if (prev is not None and model_config.connect_dim) else None
    tr_logits, tr_feats = train.predict_dataset(
        model_config, params, ds.x_train, prev_features=prev_train, replicated_params=rep, **kw
    )
    te_logits, te_feats = train.predict_dataset(
        model_config, params, ds.x_test, prev_features=prev_test, replicated_params=rep, **kw
    )
    return Member(name, size, model_config, params, tr_logits, tr_feats, te_logits, te_feats, info)


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


def train_teacher(run: Run) -> Member:
  cfg = run.config
  return run.stage(
      "teacher",
      "teacher",
      run.sizes["teacher"],
      losses.hard("student"),
      run.parsed["teacher_optim"],
      seed=cfg.seed,
      augment=cfg.teacher.augment,
  )


def _student_config(run: Run, size: str, prev: Member | None) -> ModelConfig:
  model_config = run.sizes[size]
  if run.settings.connect and prev is not None:
    model_config = model_config.replace(connect_dim=prev.config.d_model)
  return model_config


def distil_ensemble(run: Run, teacher: Member) -> tuple[list[Member], list[dict]]:
  """The ensemble (boosting) loop; returns accepted students and a decision log."""
  s, cfg = run.settings, run.config
  val, val_labels = run.val_index, run.dataset.y_train[run.val_index]
  teacher_flops = flops.count_flops(teacher.config)
  budget = s.flops_budget_pct / 100.0 * teacher_flops
  teacher_val_acc = accuracy(teacher.train_logits[val], val_labels)
  accepted: list[Member] = []
  log: list[dict] = []
  used_flops = 0
  for rung, size in enumerate(s.ladder):
    if len(accepted) >= s.max_students:
      log.append({"stop": f"max_students={s.max_students} reached"})
      break
    k = len(accepted) + 1
    prev = accepted[-1] if accepted else None
    model_config = _student_config(run, size, prev)
    size_flops = flops.count_flops(model_config)
    if used_flops + size_flops > budget:
      log.append(
          {
              "stop": f"size {size} would exceed the FLOPs budget "
              f"({100 * (used_flops + size_flops) / teacher_flops:.1f}% > "
              f"{s.flops_budget_pct}%)"
          }
      )
      break
    prefix_train = sum(m.train_logits for m in accepted) if accepted else None
    # What the stage reads of the frozen models: the teacher's logits, the
    # prefix's (residual target) and the previous student's features (connect).
    needs_prefix = bool(accepted) and (s.target == "residual" or bool(model_config.connect_dim))

    def cached():  # called by run.stage in this iteration, only if the stage trains
      tables = {"teacher_logits": run.table(teacher)}
      if needs_prefix:
        tables["prefix_logits"] = sum(run.table(m, p) for m, p in zip(accepted, [None] + accepted))
        if model_config.connect_dim:
          tables["prev_features"] = run.table(
              prev, accepted[-2] if len(accepted) > 1 else None, features=True
          )
      return tables

    frozen_students = accepted if needs_prefix else []
    spec = train.FrozenSpec(
        teacher=teacher.config, students=tuple(m.config for m in frozen_students)
    )
    frozen = train.Frozen(teacher=teacher.params, students=tuple(m.params for m in frozen_students))
    decision = None
    for attempt in range(1 + s.reseeds):
      seed = cfg.seed + 1000 * k + 100 * rung + attempt
      name = f"student_{k}_{size}_try{attempt + 1}"
      member = run.stage(
          name,
          size,
          model_config,
          stage_loss_for(s, first=not accepted),
          run.parsed["student_optim"],
          seed=seed,
          augment=cfg.student.augment,
          cached=cached,
          spec=spec,
          frozen=frozen,
          prev=prev,
          views=run.views,
      )
      decision = weak_learner_decision(
          teacher=teacher.train_logits[val],
          candidate=member.train_logits[val],
          prefix=None if prefix_train is None else prefix_train[val],
          labels=val_labels,
          settings=s,
      )
      entry = {"candidate": name, "size": size, **dataclasses.asdict(decision)}
      log.append(entry)
      logging.info(
          "%s %s: %s", name, "ACCEPTED" if decision.accepted else "rejected", decision.reason
      )
      if decision.accepted:
        member = member.scaled(decision.weight)  # F_k = F_{k-1} + eta_k f_k, a plain sum
        member.name = f"student_{k}"
        member.info = dict(member.info, **entry)
        accepted.append(member)
        used_flops += size_flops
        break
    if (
        decision.accepted
        and 0 <= s.epsilon
        and decision.accuracy_after >= teacher_val_acc - s.epsilon
    ):
      log.append(
          {
              "stop": f"held-out accuracy {decision.accuracy_after:.4f} within "
              f"epsilon={s.epsilon} of the teacher's {teacher_val_acc:.4f}"
          }
      )
      break
  else:
    log.append({"stop": "ladder exhausted"})
  return accepted, log


def distil_chain(run: Run, teacher: Member) -> tuple[list[Member], list[dict]]:
  """Teacher-assistant chain: each size (largest first) distils the previous model."""
  s, cfg = run.settings, run.config
  order = sorted(s.ladder, key=lambda n: -flops.count_flops(run.sizes[n]))[: s.max_students]
  previous, students = teacher, []
  for k, size in enumerate(order, start=1):
    member = run.stage(
        f"chain_{k}_{size}",
        size,
        run.sizes[size],
        stage_loss_for(s, first=True),
        run.parsed["student_optim"],
        seed=cfg.seed + 1000 * k,
        augment=cfg.student.augment,
        cached=lambda: {"teacher_logits": run.table(previous)},
        spec=train.FrozenSpec(teacher=previous.config),
        frozen=train.Frozen(teacher=previous.params),
        views=run.views,
    )
    member.name = f"student_{k}"
    students.append(member)
    previous = member
  return students, [{"chain": [m.size for m in students]}]


def train_baselines(run: Run, students: Sequence[Member]) -> list[Member]:
  """Each student's size trained alone with cross-entropy on the same budget."""
  out = []
  for k, student in enumerate(students, start=1):
    cfg = student.config.replace(connect_dim=0)
    member = run.stage(
        f"baseline_{k}_{student.size}",
        student.size,
        cfg,
        losses.hard("student"),
        run.parsed["student_optim"],
        seed=run.config.seed + 7 + 1000 * k,
        augment=run.config.student.augment,
        views=run.views,
    )
    member.name = f"baseline_{k}"
    out.append(member)
  return out


# ----------------------------------------------------------------------------
# Evaluation rows.
# ----------------------------------------------------------------------------


def _latency(
    configs: Sequence[ModelConfig], params: Sequence[Any], image_shape, batch: int, repeats: int
) -> float:
  """Median per-image ms of the summed forward of ``configs`` at ``batch``."""
  configs, params = tuple(configs), jax.device_put(tuple(params))

  @jax.jit
  def forward(params, images):  # params are an argument, not constants baked into the program
    logits, _ = train.apply_students(configs, params, images)
    return sum(logits[1:], logits[0])

  images = jnp.zeros((batch, *image_shape), jnp.float32)
  return (
      report.compute_latency_ms(
          functools.partial(forward, params), images, repeats=repeats, warmup=2
      )
      / batch
  )


def build_rows(
    run: Run, teacher: Member, students: Sequence[Member], baselines: Sequence[Member]
) -> list[report.Row]:
  """One row per model and per ensemble prefix (ensemble mode)."""
  y = run.dataset.y_test
  teacher_pred = teacher.test_logits.argmax(-1)
  teacher_flops = flops.count_flops(teacher.config)
  lat = run.config.report
  shape = run.dataset.image_shape

  def row(name, kind, size, members: Sequence[Member], logits):
    configs = [m.config for m in members]
    f = sum(flops.count_flops(c) for c in configs)
    b1 = b256 = None
    if lat.latency:
      b1 = _latency(configs, [m.params for m in members], shape, 1, lat.repeats)
      b256 = _latency(configs, [m.params for m in members], shape, 256, max(3, lat.repeats // 5))
    return report.Row(
        name=name,
        kind=kind,
        size=size,
        params=sum(flops.count_params(c) for c in configs),
        flops=f,
        pct_teacher_flops=100.0 * f / teacher_flops,
        accuracy=accuracy(logits, y),
        agreement=float(np.mean(logits.argmax(-1) == teacher_pred)),
        latency_ms_b1=b1,
        latency_ms_b256=b256,
    )

  rows = [row("teacher", "teacher", "teacher", [teacher], teacher.test_logits)]
  for m in students:
    if m.config.connect_dim:
      continue  # a connected student is not a standalone classifier; see its prefix row
    rows.append(row(m.name, "student", m.size, [m], m.test_logits))
  if run.settings.mode == "ensemble":
    for k, logits in enumerate(prefix_sums([m.test_logits for m in students]), start=1):
      rows.append(
          row(
              f"prefix_1..{k}",
              "prefix",
              "+".join(m.size for m in students[:k]),
              students[:k],
              logits,
          )
      )
  for m in baselines:
    rows.append(row(m.name, "baseline", m.size, [m], m.test_logits))
  return rows


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> list[report.Row]:
  """The whole job: teacher, PKD students, baselines, report. Returns the rows.

  Re-running with the same workdir resumes: completed stages are restored, an
  interrupted stage continues from its latest checkpoint.
  """
  t0 = time.time()
  run = Run(config, workdir)
  teacher = train_teacher(run)
  logging.info(
      "teacher: held-out accuracy %.4f, test accuracy %.4f",
      accuracy(teacher.train_logits[run.val_index], run.dataset.y_train[run.val_index]),
      accuracy(teacher.test_logits, run.dataset.y_test),
  )
  if run.settings.mode == "ensemble":
    students, decisions = distil_ensemble(run, teacher)
  else:
    students, decisions = distil_chain(run, teacher)
  baselines = train_baselines(run, students) if config.baselines else []
  rows = build_rows(run, teacher, students, baselines)
  meta = {
      "dataset": run.dataset.name,
      "mode": run.settings.mode,
      "seed": config.seed,
      "ladder_family": config.model.ladder,
      "num_train": int(len(run.train_index)),
      "num_heldout": int(len(run.val_index)),
      "num_test": int(run.dataset.num_test),
      "decisions": _jsonable(decisions),
  }
  if run.writer_process:
    paths = report.write_report(run.workdir, rows, meta=meta)
    logging.info("report written: %s", ", ".join(str(p) for p in paths.values()))
  run.metrics.close()
  parallel.sync("report")
  print(report.format_table(rows), flush=True)
  print(f"total wall time {time.time() - t0:.0f}s", flush=True)
  return rows


def _jsonable(value):
  return json.loads(json.dumps(value, default=float))
