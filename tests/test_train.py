"""Training steps and the stage loop: frozen models, caching, devices, eval coverage."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_pkd import checkpoints, evaluate, losses, models, parallel, train
from mamba_pkd import data as data_lib

from conftest import jit_apply, smoke_env

TINY = dict(image_shape=(8, 8, 1), num_classes=3, patch_size=4, d_state=2, scan_method="sequential")
TEACHER = models.ModelConfig(d_model=8, n_layers=1, **TINY)
STUDENT = models.ModelConfig(d_model=4, n_layers=1, **TINY)


@pytest.fixture(scope="module")
def dataset():
  return data_lib.load_dataset(
      "synthetic:num_train=64,num_test=37,height=8,width=8,num_classes=3", seed=0
  )


def _batch(dataset, n=16):
  b = next(data_lib.train_batches(dataset, batch_size=n, seed=0, epoch=0))
  return {"image": b["image"], "label": b["label"]}, b["index"]


def test_frozen_teacher_is_read_but_neither_trained_nor_checkpointed(dataset, tmp_path):
  """Pure distillation (alpha = 0): the student follows whichever teacher it is given, and the
  stage's checkpoint holds exactly the student's train state (a template without any teacher
  leaf restores it; a structure mismatch would raise)."""
  optim = train.OptimConfig(epochs=1, batch_size=16, learning_rate=1e-2)
  data = train.StageData(dataset, np.arange(dataset.num_train), augment="shift")

  def distil(teacher_seed, checkpointer=None):
    teacher = models.init_params(TEACHER, jax.random.key(teacher_seed))
    return train.train_stage(
        name="s",
        model_config=STUDENT,
        stage_loss=losses.kd(0.0, 4.0),
        optim=optim,
        data=data,
        seed=0,
        spec=train.FrozenSpec(teacher=TEACHER),
        frozen=train.Frozen(teacher=teacher),
        checkpointer=checkpointer,
    )

  with checkpoints.StageCheckpointer(tmp_path / "s") as ckpt:
    student_a = distil(1, ckpt)
    tx = train.create_optimizer(optim, 4)
    template = parallel.to_host(train.create_train_state(student_a, tx))
    step, saved = ckpt.restore_latest(template)
  student_b = distil(2)
  # The teacher is read: another teacher gives another student (same seed, same batches).
  differ = jax.tree.map(lambda a, b: not np.allclose(a, b), student_a, student_b)
  assert any(jax.tree.leaves(differ))
  # The checkpoint is the student's state: its params are the returned student's.
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, saved.params, student_a)
  teacher_leaves = jax.tree.leaves(models.init_params(TEACHER, jax.random.key(1)))
  saved_shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(saved)}
  teacher_only = {tuple(x.shape) for x in teacher_leaves} - {
      tuple(np.shape(x)) for x in jax.tree.leaves(student_a)
  }
  assert teacher_only and not teacher_only & saved_shapes


def test_cached_frozen_outputs_equal_computed_ones(dataset):
  """Same step whether the teacher/prefix logits come cached in the batch or are computed."""
  teacher = models.init_params(TEACHER, jax.random.key(1))
  s1 = models.init_params(STUDENT, jax.random.key(2))
  spec = train.FrozenSpec(teacher=TEACHER, students=(STUDENT,))
  frozen = train.Frozen(teacher=teacher, students=(s1,))
  batch, _ = _batch(dataset)
  images = jnp.asarray(batch["image"][0])
  computed = train.frozen_outputs(spec, frozen, {"image": images})
  g = jit_apply(TEACHER)({"params": teacher}, images)
  f1 = jit_apply(STUDENT)({"params": s1}, images)
  np.testing.assert_allclose(computed["teacher"], g, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(computed["prefix"], f1, rtol=1e-6, atol=1e-6)

  tx = train.create_optimizer(train.OptimConfig(), 10)
  step = parallel.data_parallel(
      train.make_train_step(STUDENT, tx, losses.kd(0.3, 2.0, view=losses.residual()), spec)
  )
  state = parallel.replicate(
      train.create_train_state(models.init_params(STUDENT, jax.random.key(3)), tx)
  )
  rngs = parallel.device_keys(jax.random.key(0))
  _, m_computed = step(state, batch, parallel.replicate(frozen), rngs)
  cached = dict(batch, teacher_logits=np.asarray(g)[None], prefix_logits=np.asarray(f1)[None])
  _, m_cached = step(state, cached, parallel.replicate(frozen), rngs)
  np.testing.assert_allclose(m_cached["loss"], m_computed["loss"], rtol=1e-5)


def test_example_weights_in_the_batch_weight_the_stage_loss(dataset):
  """``example_weight`` (pkd.cascade_focus) reaches the loss: the step's loss is the
  weighted mean of per-row KD losses computed by hand in NumPy, rows of weight 0 excluded."""
  alpha, t = 0.3, 2.0
  batch, _ = _batch(dataset)
  images, labels = batch["image"][0], batch["label"][0]
  params = models.init_params(STUDENT, jax.random.key(3))
  teacher = np.asarray(
      jit_apply(TEACHER)(
          {"params": models.init_params(TEACHER, jax.random.key(1))}, jnp.asarray(images)
      ),
      np.float64,
  )
  student = np.asarray(jit_apply(STUDENT)({"params": params}, jnp.asarray(images)), np.float64)
  w = np.zeros(len(labels))
  w[: len(w) // 2] = np.linspace(0.5, 3.0, len(w) // 2)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  ce = -log_softmax(student)[np.arange(len(labels)), labels]
  p_t = np.exp(log_softmax(teacher / t))
  kl = (p_t * (log_softmax(teacher / t) - log_softmax(student / t))).sum(-1)
  per_row = alpha * ce + (1 - alpha) * t**2 * kl
  expected = (w * per_row).sum() / w.sum()

  tx = train.create_optimizer(train.OptimConfig(), 10)
  step = parallel.data_parallel(
      train.make_train_step(STUDENT, tx, losses.kd(alpha, t), train.FrozenSpec())
  )
  state = parallel.replicate(train.create_train_state(params, tx))
  rngs = parallel.device_keys(jax.random.key(0))
  frozen = parallel.replicate(train.Frozen())
  cached = dict(batch, teacher_logits=teacher.astype(np.float32)[None])
  _, weighted = step(state, dict(cached, example_weight=w.astype(np.float32)[None]), frozen, rngs)
  _, uniform = step(state, cached, frozen, rngs)
  np.testing.assert_allclose(float(np.ravel(weighted["loss"])[0]), expected, rtol=1e-4)
  np.testing.assert_allclose(float(np.ravel(uniform["loss"])[0]), per_row.mean(), rtol=1e-4)
  assert abs(expected - per_row.mean()) > 1e-3  # the weights matter in this batch


def test_view_pool_batches_carry_the_outputs_of_their_own_view():
  """With a view pool, each example's cached row is the row of the view it is shown in."""
  n, num_views = 48, 3
  ds = data_lib.load_dataset(
      "synthetic:num_train=64,num_test=8,height=8,width=8,num_classes=3", seed=0
  )
  train_index = np.arange(5, 5 + n)
  # Pixel value v * 64 + position identifies (view, position) in every image.
  codes = np.arange(num_views)[:, None] * 64 + np.arange(n)[None, :]  # [V, n]
  views = np.broadcast_to(codes[:, :, None, None, None], (num_views, n, 8, 8, 1)).astype(np.uint8)
  table = codes.reshape(-1, 1).astype(np.float32)  # row view * n + position holds its code
  data = train.StageData(
      ds, train_index, augment="shift", cached={"teacher_logits": table}, views=views
  )
  assert data.uses_cache
  seen_views = set()
  for epoch in range(2):
    chosen = data_lib.epoch_views(n, num_views, 7, epoch)
    for batch in train._stage_batches(data, batch_size=16, seed=7, epoch=epoch):
      pixel = np.rint((batch["image"][..., 0, 0, 0] * ds.std[0] + ds.mean[0]) * 255.0)
      np.testing.assert_array_equal(pixel, batch["teacher_logits"][..., 0])
      position = (pixel % 64).astype(int)
      np.testing.assert_array_equal(pixel // 64, chosen[position])
      np.testing.assert_array_equal(batch["label"], ds.y_train[train_index[position]])
      seen_views |= set(chosen[position].ravel())
  assert seen_views == set(range(num_views))
  with pytest.raises(ValueError, match="views must be"):
    train.StageData(ds, train_index[:10], views=views)


def test_frozen_prefix_chains_connected_students_like_hand_chained_apply():
  images = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
  cfgs = (STUDENT, STUDENT.replace(d_model=6, connect_dim=STUDENT.d_model))
  params = tuple(models.init_params(c, jax.random.key(i)) for i, c in enumerate(cfgs))
  out = train.frozen_outputs(
      train.FrozenSpec(students=cfgs), train.Frozen(students=params), {"image": images}
  )
  # By hand: student 2 reads student 1's pooled features.
  f1, h1 = jit_apply(cfgs[0])({"params": params[0]}, images, return_features=True)
  f2, h2 = jit_apply(cfgs[1])({"params": params[1]}, images, h1, return_features=True)
  np.testing.assert_allclose(out["prefix"], f1 + f2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["prev_features"], h2, rtol=1e-6, atol=1e-6)
  # Not chained, student 2 would see zeros instead of features: a different prefix.
  f2_alone = jit_apply(cfgs[1])({"params": params[1]}, images, jnp.zeros_like(h1))
  assert not np.allclose(out["prefix"], f1 + f2_alone)


def test_predict_dataset_covers_every_example(dataset):
  params = models.init_params(STUDENT, jax.random.key(0))
  logits, feats = evaluate.predict_dataset(
      STUDENT, params, dataset.x_test, mean=dataset.mean, std=dataset.std, batch_size=16
  )
  assert logits.shape == (37, 3) and feats.shape == (37, 4)
  images = data_lib.normalize(dataset.x_test, dataset.mean, dataset.std)
  direct = jit_apply(STUDENT)({"params": params}, images)
  np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-6)


def test_latency_programs_compiled_ahead_are_the_summed_forward_and_reused():
  """The report's latency programs, compiled on the background thread, compute F_k = f_1 + f_2
  (against a hand-chained ``apply``), at each batch; a row asking again (a baseline of the
  same size) gets the same compiled program, not a new compile; ``build_rows`` times them."""
  import types  # pylint: disable=g-import-not-at-top

  cfgs = (STUDENT, STUDENT.replace(d_model=8))
  members = [
      types.SimpleNamespace(config=c, params=models.init_params(c, jax.random.key(i)))
      for i, c in enumerate(cfgs)
  ]
  programs = evaluate.LatencyPrograms(TINY["image_shape"])
  programs.start([members[:1], members], batches=(1, 5))
  images = jax.random.normal(jax.random.key(9), (5, 8, 8, 1))
  params = jax.device_put(tuple(m.params for m in members))
  forward = programs.get(cfgs, params, 5)
  f1 = jit_apply(cfgs[0])({"params": params[0]}, images)
  f2 = jit_apply(cfgs[1])({"params": params[1]}, images)
  np.testing.assert_allclose(forward(params, images), f1 + f2, rtol=1e-6, atol=1e-6)
  assert programs.get(cfgs[:1], params[:1], 1) is programs.get(cfgs[:1], params[:1], 1)
  assert programs.get(cfgs, params, 5) is forward
  # Not started ahead: compiled on request, then kept.
  alone = programs.get(cfgs[1:], params[1:], 3)
  np.testing.assert_allclose(alone(params[1:], images[:3]), f2[:3], rtol=1e-6, atol=1e-6)
  assert programs.get(cfgs[1:], params[1:], 3) is alone
  programs.close()

  logits = np.asarray(f1)
  trained = [
      types.SimpleNamespace(**vars(m), name=f"m{i}", size=f"s{i}", test_logits=logits)
      for i, m in enumerate(members)
  ]
  rows = evaluate.build_rows(
      teacher=trained[1],
      students=trained[:1],
      baselines=trained[:1],
      labels=np.zeros(5, np.int64),
      image_shape=TINY["image_shape"],
      prefixes=True,
      latency=True,
      repeats=2,
  )
  assert [r.name for r in rows] == ["teacher", "m0", "prefix_1..1", "m0"]
  for r in rows:
    assert np.isfinite(r.latency_ms_b1) and r.latency_ms_b1 > 0
    assert np.isfinite(r.latency_ms_b256) and r.latency_ms_b256 > 0


def test_non_finite_loss_stops_with_stage_and_step_range(dataset):
  params = models.init_params(STUDENT, jax.random.key(0))
  params = jax.tree.map(lambda x: x * np.nan, params)
  with pytest.raises(
      train.NonFiniteLossError, match=r"stage broken: non-finite .* between steps 0 and"
  ):
    train.train_stage(
        name="broken",
        model_config=STUDENT,
        stage_loss=losses.hard(),
        optim=train.OptimConfig(epochs=1, batch_size=16),
        seed=0,
        log_every=2,
        data=train.StageData(dataset, np.arange(dataset.num_train)),
        init=params,
    )


def test_bad_optim_values_name_the_field():
  with pytest.raises(ValueError, match="learning_rate"):
    train.OptimConfig(learning_rate=0)
  with pytest.raises(ValueError, match="epochs"):
    train.OptimConfig(epochs=0)


_MULTI_DEVICE_SCRIPT = r"""
import json, sys, numpy as np, jax
from mamba_pkd import losses, models, train
from mamba_pkd import data as data_lib


def train_small():
  ds = data_lib.load_dataset("synthetic:num_train=64,num_test=8,height=8,width=8,num_classes=3")
  cfg = models.ModelConfig(image_shape=(8, 8, 1), num_classes=3, patch_size=4, d_model=4,
                           n_layers=1, d_state=2, scan_method="sequential")
  params = train.train_stage(name="s", model_config=cfg, stage_loss=losses.hard(), seed=0,
                             optim=train.OptimConfig(epochs=2, batch_size=16),
                             data=train.StageData(ds, np.arange(64), augment="shift"))
  return [float(np.sum(np.abs(x))) for x in jax.tree.leaves(params)]


if __name__ == "__main__":
  assert jax.local_device_count() == int(sys.argv[1]), jax.devices()
  print(json.dumps(train_small()))
"""


def _run_on_devices(n):
  if n == jax.local_device_count() == 1 and jax.default_backend() == "cpu":
    namespace = {"__name__": "in_process"}  # this process already has one CPU device
    exec(_MULTI_DEVICE_SCRIPT, namespace)  # pylint: disable=exec-used
    return np.array(namespace["train_small"]())
  env = smoke_env(n)
  out = subprocess.run(
      [sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(n)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      cwd=pathlib.Path(__file__).resolve().parents[1],
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


def test_two_devices_match_one_device():
  """Same global batch on 1 and 2 (forced host) devices -> same parameters (1 device in this
  process when it has exactly one CPU device, else in a subprocess too)."""
  one, two = _run_on_devices(1), _run_on_devices(2)
  np.testing.assert_allclose(two, one, rtol=2e-5)
