"""PKD algorithm pieces (pure) and the whole job through `main` on the smoke config."""

import json
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import reference_output, shared_reference_run, smoke_data, smoke_data_flag, smoke_runs
from mamba_pkd import ensemble, manifest, settings, stages, weak_learner

REPO = pathlib.Path(__file__).resolve().parents[1]


def _settings(**kw):
  return settings.PKDSettings(**kw)


def test_cumulative_prefixes_are_running_sums():
  f = [np.full((2, 3), 1.0), np.full((2, 3), 2.0), np.full((2, 3), 4.0)]
  out = ensemble.cumulative(f)
  np.testing.assert_array_equal(out[0], f[0])
  np.testing.assert_array_equal(out[2], np.full((2, 3), 7.0))


def _teacher_and_labels(n=200, k=4, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  teacher = rng.normal(size=(n, k)) + 4.0 * np.eye(k)[labels]
  return teacher, labels


def test_weak_learner_accepts_a_student_that_moves_towards_the_teacher():
  teacher, labels = _teacher_and_labels()
  prefix = 0.3 * teacher  # an under-confident ensemble
  candidate = 0.5 * teacher  # the residual points towards the teacher
  d = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=prefix,
      candidate=candidate,
      labels=labels,
      settings=_settings(target="residual"),
  )
  assert d.accepted and d.fit_after < d.fit_before and d.edge > 0 and d.weight == 1.0
  d_edge = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=prefix,
      candidate=candidate,
      labels=labels,
      settings=_settings(target="residual", accept="edge", gamma=0.0),
  )
  assert d_edge.accepted


def test_weak_learner_rejects_a_student_that_moves_away():
  teacher, labels = _teacher_and_labels()
  prefix = 0.8 * teacher
  candidate = -0.5 * teacher
  d = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=prefix,
      candidate=candidate,
      labels=labels,
      settings=_settings(target="residual"),
  )
  assert not d.accepted and d.fit_after > d.fit_before and d.edge < 0
  d_edge = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=prefix,
      candidate=candidate,
      labels=labels,
      settings=_settings(target="residual", accept="edge"),
  )
  assert not d_edge.accepted


def test_weak_learner_rejects_improved_fit_that_costs_accuracy():
  teacher, labels = _teacher_and_labels()
  prefix = teacher.copy()
  # Shrinks the logits (KL may drop at high T) but flips the argmax of a quarter of the rows.
  candidate = np.zeros_like(teacher)
  rows = np.arange(0, len(labels), 4)
  candidate[rows] = -2 * teacher[rows]
  d = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=prefix,
      candidate=candidate,
      labels=labels,
      settings=_settings(target="residual", margin=-1e9),
  )
  assert not d.accepted and "accuracy" in d.reason


def test_first_student_is_compared_with_the_empty_ensemble():
  teacher, labels = _teacher_and_labels()
  d = weak_learner.weak_learner_decision(
      teacher=teacher, prefix=None, candidate=0.5 * teacher, labels=labels, settings=_settings()
  )
  assert d.accepted
  # "Before" is the empty ensemble: all-zero logits, i.e. the uniform distribution,
  # whose fit to the teacher is T^2 * KL(softmax(g/T) || uniform), computed by hand.
  t = _settings().temperature
  p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
  uniform_fit = t * t * np.mean(np.sum(p * (np.log(p) - np.log(1.0 / teacher.shape[1])), -1))
  assert d.fit_before == pytest.approx(uniform_fit, rel=1e-5)
  assert d.fit_after < d.fit_before


def _softmax_kl(teacher, logits, t):
  """Hand-written T^2 KL(softmax(g/T) || softmax(F/T)), float64."""

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lp, lq = log_softmax(teacher / t), log_softmax(logits / t)
  return t * t * np.mean(np.sum(np.exp(lp) * (lp - lq), -1))


def test_fit_drop_is_stated_in_standard_errors_of_the_paired_drop():
  teacher, labels = _teacher_and_labels(n=300)
  rng = np.random.default_rng(1)
  prefix = 0.3 * teacher
  # A candidate that helps on average but is noisy row by row.
  candidate = 0.02 * teacher + 0.3 * rng.normal(size=teacher.shape)
  t = 4.0
  before = weak_learner.per_example_fit(teacher, prefix, t)
  after = weak_learner.per_example_fit(teacher, prefix + candidate, t)
  # Per-row fits average to the fits of the whole held-out set (hand-written KL).
  assert before.mean() == pytest.approx(_softmax_kl(teacher, prefix, t), rel=1e-9)
  assert after.mean() == pytest.approx(_softmax_kl(teacher, prefix + candidate, t), rel=1e-9)
  d = before - after
  se = np.sqrt(np.sum((d - d.mean()) ** 2) / (len(d) - 1) / len(d))  # by hand
  assert weak_learner.fit_drop_se(before, after) == pytest.approx(se, rel=1e-9)
  z = d.mean() / se
  assert 0.5 < z < 20  # an improvement, a few standard errors strong

  def decide(margin_se):
    return weak_learner.weak_learner_decision(
        teacher=teacher,
        prefix=prefix,
        candidate=candidate,
        labels=labels,
        settings=_settings(target="residual", margin_se=margin_se, max_accuracy_drop=1.0),
    )

  below, above = decide(0.99 * z), decide(1.01 * z)
  assert below.accepted and not above.accepted
  assert below.fit_drop_se == pytest.approx(se, rel=1e-9)
  assert f"({z:.1f} standard errors)" in above.reason


def test_calibrated_fit_is_the_best_rescaled_fit():
  teacher, _ = _teacher_and_labels()
  rng = np.random.default_rng(1)
  ensemble = teacher + rng.normal(size=teacher.shape)
  fit, scale = weak_learner.calibrated_fit(teacher, ensemble, 4.0)
  by_hand = [_softmax_kl(teacher, c * ensemble, 4.0) for c in weak_learner.FIT_SCALES]
  assert fit == pytest.approx(min(by_hand), rel=1e-6)
  assert scale == pytest.approx(weak_learner.FIT_SCALES[int(np.argmin(by_hand))])
  assert fit <= weak_learner.teacher_fit(teacher, ensemble, 4.0) + 1e-6
  # Invariant to the logits' scale (10**0.5 is 10 steps of the scale grid).
  fit_big, scale_big = weak_learner.calibrated_fit(teacher, 10**0.5 * ensemble, 4.0)
  assert fit_big == pytest.approx(fit, rel=1e-6)
  assert scale_big == pytest.approx(scale / 10**0.5, rel=1e-6)


def test_line_search_weights_a_useful_student_and_zeroes_a_harmful_one():
  teacher, labels = _teacher_and_labels()
  rng = np.random.default_rng(2)
  prefix = 0.5 * teacher + 2.0 * rng.normal(size=teacher.shape)  # a weak, noisy first student
  good = teacher + 0.5 * rng.normal(size=teacher.shape)  # a better, independent student
  eta, c, fit = weak_learner.line_search(teacher, prefix, good, 4.0)
  assert eta > 1.0  # the better student gets more weight than the weak prefix
  assert fit < weak_learner.calibrated_fit(teacher, prefix, 4.0)[0]
  assert fit == pytest.approx(_softmax_kl(teacher, c * (prefix + eta * good), 4.0), rel=1e-6)
  eta_bad, _, fit_bad = weak_learner.line_search(teacher, prefix, -teacher, 4.0)
  assert eta_bad == 0.0 and fit_bad == pytest.approx(
      weak_learner.calibrated_fit(teacher, prefix, 4.0)[0]
  )


def test_teacher_target_decision_records_the_weight():
  teacher, labels = _teacher_and_labels()
  rng = np.random.default_rng(3)
  prefix = 0.5 * teacher + 2.0 * rng.normal(size=teacher.shape)
  good = teacher + 0.5 * rng.normal(size=teacher.shape)
  d = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=prefix,
      candidate=good,
      labels=labels,
      settings=_settings(target="teacher"),
  )
  assert d.accepted and d.weight > 1.0 and d.fit_after < d.fit_before
  assert d.accuracy_after == weak_learner.accuracy(prefix + d.weight * good, labels)
  assert d.accuracy_after > d.accuracy_before
  d_bad = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=prefix,
      candidate=-teacher,
      labels=labels,
      settings=_settings(target="teacher"),
  )
  assert not d_bad.accepted and d_bad.weight == 0.0 and "weight 0" in d_bad.reason
  first = weak_learner.weak_learner_decision(
      teacher=teacher,
      prefix=None,
      candidate=prefix,
      labels=labels,
      settings=_settings(target="teacher"),
  )
  assert first.accepted and first.weight == 1.0 and first.accuracy_before == 0.0


def test_focus_weights_move_a_share_of_the_loss_onto_what_the_prefix_is_unsure_of():
  """Hand count: top-1 probabilities 0.75 and 0.5 (logits ln 3, 0 and 0, 0 at T = 1)
  leave unsure shares 0.25 and 0.5 (mean 0.375); focus 1 weights 2/3 and 4/3, focus 0.5
  halfway to uniform, focus 0 uniform. The temperature divides the logits first."""
  prefix = np.array([[np.log(3.0), 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(weak_learner.focus_weights(prefix, 1.0, 1.0), [2 / 3, 4 / 3], 1e-6)
  np.testing.assert_allclose(weak_learner.focus_weights(prefix, 1.0, 0.5), [5 / 6, 7 / 6], 1e-6)
  np.testing.assert_array_equal(weak_learner.focus_weights(prefix, 1.0, 0.0), [1.0, 1.0])
  # At T = 2 the first row's top-1 probability is sqrt(3) / (sqrt(3) + 1).
  u = np.array([1 - np.sqrt(3) / (np.sqrt(3) + 1), 0.5])
  np.testing.assert_allclose(weak_learner.focus_weights(prefix, 2.0, 1.0), u / u.mean(), 1e-6)
  certain = np.array([[1e4, 0.0], [0.0, 1e4]])  # nothing left to emphasise: uniform
  np.testing.assert_array_equal(weak_learner.focus_weights(certain, 1.0, 1.0), [1.0, 1.0])
  with pytest.raises(ValueError, match="focus must be in"):
    weak_learner.focus_weights(prefix, 1.0, 1.5)


def test_weighted_member_folds_the_weight_into_head_and_logits():
  from mamba_pkd import models  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  cfg = models.ModelConfig(
      image_shape=(8, 8, 1),
      patch_size=4,
      d_model=4,
      n_layers=1,
      d_state=2,
      num_classes=3,
      scan_method="sequential",
  )
  params = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.key(0)))
  ones = np.ones((2, 3), np.float32)
  m = stages.Trained("s", "s", "s1", cfg, params, ones, ones[:, :2], 2 * ones, ones[:, :2])
  scaled = m.weighted(3.0)
  np.testing.assert_array_equal(scaled.train_logits, 3 * ones)
  np.testing.assert_array_equal(scaled.test_logits, 6 * ones)
  np.testing.assert_array_equal(scaled.train_features, m.train_features)
  np.testing.assert_allclose(scaled.params["head"]["kernel"], 3 * params["head"]["kernel"])
  np.testing.assert_array_equal(m.train_logits, ones)  # the original is not modified
  assert scaled.weight == 3.0 and scaled.as_member().weight == 3.0
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
  model = models.create_model(cfg)
  np.testing.assert_allclose(
      model.apply({"params": scaled.params}, x), 3 * model.apply({"params": params}, x), rtol=1e-5
  )


def _smoke_config():
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("smoke", REPO / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("pkd.alpha", 1.5, "pkd.alpha"),
        ("pkd.temperature", 0.0, "pkd.temperature"),
        ("pkd.mode", "boost", "pkd.mode"),
        ("pkd.max_students", 0, "pkd.max_students"),
        ("pkd.ladder", (), "pkd.ladder is empty"),
        ("pkd.ladder", ("s1", "huge"), "unknown size"),
        ("model.ladder", "imagenet", "model.ladder"),
        ("teacher.learning_rate", -1.0, "teacher.learning_rate"),
        ("student.augment", "mixup", "student.augment"),
        ("pkd.target", "boost", "pkd.target"),
        ("pkd.loss", "bdistil", "needs pkd.target='residual'"),
        ("student.cached_views", -1, "student.cached_views"),
        ("report.cascade_budgets_pct", (2.0, -1.0), "report.cascade_budgets_pct"),
        ("report.cascade_teacher", "maybe", "report.cascade_teacher"),
        ("report.cascade_bootstrap", -1, "report.cascade_bootstrap"),
        ("pkd.margin_se", -1.0, "pkd.margin_se"),
        ("pkd.cascade_focus", 1.5, r"pkd.cascade_focus must be a number in \[0, 1\]"),
    ],
)
def test_bad_config_values_are_named(path, value, match):
  config = _smoke_config()
  section, field = path.split(".")
  with config.unlocked():
    config[section][field] = value
  with pytest.raises(ValueError, match=match):
    settings.validate_config(config)


@pytest.mark.parametrize("name", ["default", "smoke", "mnist", "cifar10"])
def test_shipped_configs_are_valid(name):
  import runpy  # pylint: disable=g-import-not-at-top

  config = runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"]()
  parsed = settings.validate_config(config)
  assert parsed["settings"].target in settings.TARGETS


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"connect": False}, "it needs pkd.connect=True"),
        ({"ladder": ("s1", "cnn_s2")}, r"only Mamba students have; the ladder has \['cnn_s2'\]"),
    ],
)
def test_token_connections_need_connected_mamba_students(changes, match):
  config = _smoke_config()
  config.pkd.connect = True
  config.pkd.connect_tokens = True
  settings.validate_config(config)  # valid as shipped, with token connections on
  with config.unlocked():
    for field, value in changes.items():
      config.pkd[field] = value
  with pytest.raises(ValueError, match=match):
    settings.validate_config(config)


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("student.cached_views", 0, "pkd.cascade_focus=0.5 weights examples by the prefix"),
        ("pkd.mode", "chain", "it needs pkd.mode='ensemble'"),
    ],
)
def test_cascade_focus_needs_the_ensemble_and_cached_views(path, value, match):
  config = _smoke_config()
  config.pkd.cascade_focus = 0.5
  settings.validate_config(config)  # valid as shipped, with the focus on
  section, field = path.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=match):
    settings.validate_config(config)


def test_views_without_augmentation_are_rejected():
  config = _smoke_config()
  config.student.augment = "none"
  config.student.cached_views = 4
  with pytest.raises(ValueError, match="cached_views=4 needs an augmentation"):
    settings.validate_config(config)


RESIDUAL = (
    "--config.pkd.target=residual",
    "--config.pkd.connect=True",
    "--config.pkd.connect_tokens=True",  # student 2 reads student 1's token states
    "--config.baselines=False",
    "--config.pkd.margin=-1000.0",
    "--config.pkd.repeat_size=True",  # every student is accepted: s1 again, not s2
    "--config.pkd.cascade_focus=0.5",  # student 2's examples weighted by student 1's doubt
)


@pytest.fixture(scope="module")
def copy_and_residual(tmp_path_factory):
  """A copy of the shared reference run (the export and predict checks read it), and the
  residual-target run with connections (``RESIDUAL``) in its own workdir, on its own copy
  of the smoke arrays (``data.npz`` beside the workdir; the test moves it away). (The
  reference's command run again on a copy, restoring every stage and rewriting the same
  report bytes, is tests/test_workdir_lock.py's winning run.)

  Returns (copy, (workdir, CompletedProcess)).
  """
  reference = shared_reference_run(tmp_path_factory)
  copy = tmp_path_factory.mktemp("copy") / "run"
  shutil.copytree(reference, copy)
  residual = tmp_path_factory.mktemp("residual") / "run"
  own_data = residual.with_name("data.npz")
  shutil.copy(smoke_data(tmp_path_factory), own_data)
  (out,) = smoke_runs(
      tmp_path_factory, [(residual, 1, (f"--config.dataset=npz:{own_data}", *RESIDUAL))]
  )
  return copy, (residual, out)


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  """``python -m <module> <args>`` from the repository, output captured."""
  return subprocess.run(
      [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600
  )


def test_smoke_run_through_main_writes_a_consistent_report(
    tmp_path_factory, tmp_path, copy_and_residual
):
  """The smoke job on the user's own arrays (npz; conftest's shared reference run): report,
  manifest, export and predict (with its budgets; on a copy)."""
  from mamba_pkd import data as data_lib  # pylint: disable=g-import-not-at-top

  reference = shared_reference_run(tmp_path_factory)
  data_file = smoke_data(tmp_path_factory)
  ds = data_lib.load_dataset(f"npz:{data_file}", seed=0)
  stdout, _ = reference_output(reference)
  assert "| teacher |" in stdout
  results = json.loads((reference / "results.json").read_text())
  assert results["meta"]["dataset"] == f"npz:{data_file}"
  rows = {r["name"]: r for r in results["rows"]}
  teacher_flops = rows["teacher"]["flops"]
  students = [r for r in results["rows"] if r["kind"] == "student"]
  prefixes = [r for r in results["rows"] if r["kind"] == "prefix"]
  assert students and len(prefixes) == len(students)
  for k, prefix in enumerate(prefixes, start=1):
    assert prefix["flops"] == sum(s["flops"] for s in students[:k])
    assert prefix["params"] == sum(s["params"] for s in students[:k])
  for r in results["rows"]:
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
    assert r["pct_teacher_flops"] == pytest.approx(100.0 * r["flops"] / teacher_flops, rel=1e-6)
  assert rows["teacher"]["agreement"] == 1.0
  accepted = [d for d in results["meta"]["decisions"] if d.get("accepted")]
  assert len(accepted) == len(students)
  for name in ("results.md", "accuracy_vs_flops.png", "config.json", "metrics.jsonl"):
    assert (reference / name).exists(), name
  metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
  assert {m["stage"] for m in metrics} >= {"teacher"}
  assert list((reference / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard summaries

  workdir, _ = copy_and_residual  # a copy of the reference

  # The manifest, written by the run, agrees with its decisions and its report.
  m = manifest.read_manifest(workdir)
  accepted_stages = [d["candidate"] for d in results["meta"]["decisions"] if d.get("accepted")]
  assert [s.stage for s in m.students] == accepted_stages
  assert [s.weight for s in m.students] == [d["weight"] for d in accepted]
  assert [s.prefix_scale for s in m.students] == [d["scale"] for d in accepted]
  assert m.prefix_accuracy == [r["accuracy"] for r in prefixes]
  assert [s.flops for s in m.students] == [r["flops"] for r in students]
  assert m.teacher.flops == teacher_flops and len(m.baselines) == len(students)
  assert m.preprocessing.mean == pytest.approx(list(ds.mean), rel=1e-6)

  # The combination (manifest v2) and the cascade rows of the report agree.
  assert m.combination is not None and len(m.combination.prefixes) == len(students)
  config = _smoke_config()
  budgets = [f"{b:g}%" for b in config.report.cascade_budgets_pct]
  assert sorted(m.combination.cascades) == sorted(budgets)
  cascades = {r["name"]: r for r in results["rows"] if r["kind"] == "cascade"}
  stored = {k: v for k, v in m.combination.cascades.items() if v is not None}
  assert stored and sorted(cascades) == sorted(f"cascade@{k}" for k in stored)
  meta = results["meta"]["cascade"]
  for label, rule in stored.items():
    assert rule["heldout_pct_teacher_flops"] <= rule["budget_pct"] + 1e-9
    row = cascades[f"cascade@{label}"]
    assert row["flops"] == round(
        meta["budgets"][label]["test_pct_teacher_flops"] / 100 * teacher_flops
    )
    assert sum(meta["budgets"][label]["test_exits"]) == ds.num_test
  assert len(meta["prefixes"]) == len(students)
  assert {"ece_before", "ece_after"} <= set(meta["prefixes"][0]["test"])

  bundle = _export_and_predict_8(workdir, ds, tmp_path)

  # predict --budget runs the stored cascade: on the whole test split it reproduces the
  # report's row (accuracy, mean FLOPs), from the workdir and from the export.
  np.savez(tmp_path / "test.npz", x=ds.x_test)
  label = max(stored, key=lambda k: stored[k]["budget_pct"])
  for model in (bundle, workdir):
    predicted = _cli(
        "mamba_pkd.predict",
        f"--model={model}",
        f"--budget={label}",
        f"--output_json={tmp_path / 'c.json'}",
        str(tmp_path / "test.npz"),
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    out = json.loads((tmp_path / "c.json").read_text())
    classes = np.array([p["class"] for p in out["predictions"]])
    assert np.mean(classes == ds.y_test) == pytest.approx(cascades[f"cascade@{label}"]["accuracy"])
    assert out["pct_teacher_flops"] == pytest.approx(
        meta["budgets"][label]["test_pct_teacher_flops"], rel=1e-6
    )


def _export_and_predict_8(workdir: pathlib.Path, ds, tmp_path: pathlib.Path) -> pathlib.Path:
  """Exports ``workdir`` through the CLI and predicts 8 test images from the bundle (CLI) and
  from the run directory (in this process): the same classes. Returns the bundle."""
  from mamba_pkd import predict  # pylint: disable=g-import-not-at-top

  np.savez(tmp_path / "x.npz", x=ds.x_test[:8])
  bundle = tmp_path / "bundle"
  exported = _cli("mamba_pkd.export", f"--workdir={workdir}", f"--out={bundle}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  predicted = _cli(
      "mamba_pkd.predict",
      f"--model={bundle}",
      f"--output_json={tmp_path / 'bundle.json'}",
      str(tmp_path / "x.npz"),
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  args = [f"--output_json={tmp_path / 'workdir.json'}", str(tmp_path / "x.npz")]
  assert predict.main([f"--model={workdir}", *args]) == 0
  classes = [
      [p["class"] for p in json.loads((tmp_path / output).read_text())["predictions"]]
      for output in ("bundle.json", "workdir.json")
  ]
  assert classes[0] == classes[1] and len(classes[0]) == 8 and set(classes[0]) <= set(range(4))
  return bundle


def test_residual_target_with_connections_runs_on_the_view_pool(copy_and_residual, tmp_path):
  """The B-DISTIL path: students fit the residual and read the previous student's
  token-level features (``pkd.connect_tokens``), with the prefix logits and features computed on the view pool, and a size
  that gave a weak learner is tried again (``pkd.repeat_size``). Its dataset
  file moved away, the run is still exported and predicted from (manifest + checkpoints)."""
  from mamba_pkd import data as data_lib  # pylint: disable=g-import-not-at-top

  _, (workdir, out) = copy_and_residual  # RESIDUAL
  assert out.returncode == 0, out.stderr[-3000:]
  # Stage 2 read student 1's logits and features on the 8 x 192 pooled views.
  assert "student_1: outputs on the 1536 pooled views" in out.stderr
  # ... and its loss weighted the views by student 1's doubt (pkd.cascade_focus), which the
  # stage's fingerprint records with student 1 among the frozen models; student 1 has none.
  assert "cascade_focus=0.5 at T=" in out.stderr
  prints = {
      name: json.loads((workdir / "ckpt" / name / "fingerprint.json").read_text())["fields"]
      for name in ("student_1_s1_try1", "student_2_s1_try1")
  }
  assert prints["student_2_s1_try1"]["example_weights"] == {"cascade_focus": 0.5}
  assert "student_1" in prints["student_2_s1_try1"]["frozen"]
  assert "example_weights" not in prints["student_1_s1_try1"]
  # pkd.connect_tokens: student 1 hands on its token states, student 2 reads all of them.
  s1, s2 = prints["student_1_s1_try1"]["model"], prints["student_2_s1_try1"]["model"]
  # (An unconnected stage trains the same whatever it hands on: its fingerprint leaves
  # token_features out, so a run's student 1 is reused by a token-connected rerun.)
  assert "token_features" not in s1 and s2["token_features"] and s1["connect_dim"] == 0
  patches = (s1["image_shape"][0] // s1["patch_size"]) * (s1["image_shape"][1] // s1["patch_size"])
  assert s2["connect_dim"] == patches * s1["d_model"]
  members = json.loads((workdir / "ensemble.json").read_text())["students"]
  assert [m["config"]["token_features"] for m in members] == [True, True]
  assert [m["d_model"] for m in members][:1] == [s2["connect_dim"]]  # the width handed on
  results = json.loads((workdir / "results.json").read_text())
  accepted = [d for d in results["meta"]["decisions"] if d.get("accepted")]
  assert len(accepted) == 2 and all(d["weight"] == 1.0 for d in accepted)
  # pkd.repeat_size: the accepted s1 is tried again (a new seed), never s2.
  assert [d["candidate"] for d in accepted] == ["student_1_s1_try1", "student_2_s1_try1"]
  assert [r["name"] for r in results["rows"] if r["kind"] == "prefix"] == [
      "prefix_1..1",
      "prefix_1..2",
  ]

  data_file = workdir.with_name("data.npz")  # this run's own copy (copy_and_residual)
  assert results["meta"]["dataset"] == f"npz:{data_file}"
  ds = data_lib.load_dataset(f"npz:{data_file}", seed=0)
  data_file.rename(data_file.with_name("moved_away.npz"))
  _export_and_predict_8(workdir, ds, tmp_path)


def test_chain_ends_at_the_smallest_rung_within_the_budget():
  """Chain mode: the max_students smallest sizes, largest first, so the deployed (last)
  student is the smallest rung; a budget the smallest cannot meet fails before training."""
  import types  # pylint: disable=g-import-not-at-top

  from mamba_pkd import flops, ladders, pkd  # pylint: disable=g-import-not-at-top

  sizes = ladders.ladder_configs("mnist", image_shape=(28, 28, 1), num_classes=10)
  ladder = ("s4", "s1", "s8", "s2", "s3")  # any order: the chain sorts by FLOPs
  ctx = types.SimpleNamespace(
      sizes=sizes,
      settings=settings.PKDSettings(mode="chain", ladder=ladder, max_students=3),
  )
  assert pkd.chain_sizes(ctx) == ["s3", "s2", "s1"]
  ctx.settings = settings.PKDSettings(mode="chain", ladder=ladder, max_students=9)
  assert pkd.chain_sizes(ctx) == ["s8", "s4", "s3", "s2", "s1"]
  pct = 100 * flops.count_flops(sizes["s1"]) / flops.count_flops(sizes["teacher"])
  ctx.settings = settings.PKDSettings(mode="chain", ladder=ladder, flops_budget_pct=pct / 2)
  with pytest.raises(ValueError, match=rf"deploys the smallest size 's1', which needs {pct:.2f}%"):
    pkd.chain_sizes(ctx)
