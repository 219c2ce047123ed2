"""CNN and MLP students (issue 16): exact FLOPs/params, ladders at the Mamba rungs, McNemar,
and one smoke run through `main` with both families in the ensemble and as family rows."""

import pathlib
import shutil
import sys
import types

import jax
import numpy as np
import pytest

from conftest import shared_reference_run, smoke_data_flag, smoke_runs
from mamba_pkd import cnn_mlp, flops, ladders, models, paired, report, runs, settings

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import families  # pylint: disable=g-import-not-at-top,wrong-import-position
import render_readme  # pylint: disable=g-import-not-at-top,wrong-import-position

CNN = cnn_mlp.CNNConfig
MLP = cnn_mlp.MLPConfig


# ----------------------------------------------------------------------------
# FLOPs and parameters: hand counts, XLA, initialised models.
# ----------------------------------------------------------------------------


def test_cnn_flops_and_params_are_a_hand_count():
  """8x8x1 image, 3x3 SAME convs 2 -> 4 channels, dense 6, 10 classes.

  A 1-D SAME 3-tap conv over 8 outputs hits 8*3 - 2 = 22 real inputs (the two border
  outputs miss one tap each); over 4 outputs, 4*3 - 2 = 10.
  """
  config = CNN(image_shape=(8, 8, 1), num_classes=10, channels=(2, 4), kernel=3, hidden=6)
  conv0 = 2 * (22 * 22) * 1 * 2 + 8 * 8 * 2  # MACs over real taps (x2) + bias
  relu0 = 8 * 8 * 2
  pool0 = 4 * 4 * 2 * 3  # 3 comparisons per 2x2 window
  conv1 = 2 * (10 * 10) * 2 * 4 + 4 * 4 * 4
  relu1 = 4 * 4 * 4
  pool1 = 2 * 2 * 4 * 3
  dense = 2 * 16 * 6 + 6 + 6  # flatten 2*2*4 = 16 -> 6, bias, ReLU
  head = 2 * 6 * 10 + 10
  total = conv0 + relu0 + pool0 + conv1 + relu1 + pool1 + dense + head
  assert total == 4398
  assert flops.count_flops(config) == total
  # conv 3*3*1*2 + 2 = 20; conv 3*3*2*4 + 4 = 76; dense 16*6 + 6 = 102; head 6*10 + 10 = 70
  assert flops.count_params(config) == 20 + 76 + 102 + 70 == 268


def test_mlp_flops_and_params_are_a_hand_count():
  config = MLP(image_shape=(4, 4, 2), num_classes=3, hidden=(8, 5))
  # 32 -> 8 -> 5 -> 3: matmul (2*in*out), bias and ReLU per hidden unit; head matmul + bias
  total = (2 * 32 * 8 + 8 + 8) + (2 * 8 * 5 + 5 + 5) + (2 * 5 * 3 + 3)
  assert flops.count_flops(config) == total == 651
  assert flops.count_params(config) == (32 * 8 + 8) + (8 * 5 + 5) + (5 * 3 + 3) == 327


@pytest.mark.parametrize(
    "config",
    [
        CNN(image_shape=(8, 8, 3), channels=(2, 3), kernel=3, hidden=5),
        CNN(image_shape=(9, 7, 1), channels=(4, 6), kernel=5, hidden=7, connect_dim=3),
        MLP(image_shape=(4, 4, 2), hidden=(6, 5)),
        MLP(image_shape=(4, 4, 2), hidden=(7,), connect_dim=4),
    ],
    ids=["cnn", "cnn-odd-k5-connected", "mlp", "mlp-connected"],
)
def test_analytic_flops_equal_xla_cost_analysis(config):
  """Exactly XLA's ``flops`` (no transcendentals, no fused elementwise chains here)."""
  xla = flops.xla_forward_flops(config)
  assert xla["transcendentals"] == 0
  assert flops.count_flops(config) == xla["total"]
  params = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  assert models.count_tree_params(params) == flops.count_params(config)


@pytest.mark.parametrize(
    "ladder, shape",
    [("mnist", (28, 28, 1)), ("cifar", (32, 32, 3)), ("tiny", (16, 16, 1)), ("auto", (8, 8, 1))],
)
def test_every_rung_is_within_ten_percent_of_its_mamba_size(ladder, shape):
  sizes = ladders.ladder_configs(ladder, image_shape=shape, num_classes=10, bidirectional=True)
  other = ladders.family_sizes(sizes)
  rungs = [name for name in sizes if name != "teacher"]
  assert sorted(other) == sorted(f"{f}_{r}" for f in ("cnn", "mlp") for r in rungs)
  for name, config in other.items():
    mamba = flops.count_flops(sizes[ladders.split_size_name(name)[1]])
    assert abs(flops.count_flops(config) / mamba - 1) <= 0.10, (name, config)
  for name in (f"{f}_{r}" for f in ("cnn", "mlp") for r in (rungs[0], rungs[-1])):
    params = jax.eval_shape(lambda c=other[name]: models.init_params(c, jax.random.key(0)))
    assert models.count_tree_params(params) == flops.count_params(other[name]), name


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (8, 8, 1)])
def test_mlp_match_by_bisection_equals_the_closest_of_every_width(shape):
  """match_mlp bisects; the brute force counts every width and keeps the first closest."""
  base = cnn_mlp.MLPConfig(image_shape=shape, num_classes=10)
  costs = [flops.count_flops(base.replace(hidden=(h, max(1, h // 2)))) for h in ladders.MLP_WIDTHS]
  targets = [1, costs[0], costs[0] + 1, costs[-1], 10 * costs[-1]]
  targets += [costs[i] for i in (1, 57, 1000)] + [
      (costs[i] * costs[i + 1]) ** 0.5 for i in (3, 999)
  ]
  targets += list(np.geomspace(costs[0], costs[-1], 25))
  for target in targets:
    want = min(range(len(costs)), key=lambda i: abs(np.log(costs[i] / target)))
    got = ladders.match_mlp(target, shape, 10)
    assert got.hidden[0] == ladders.MLP_WIDTHS[want], (shape, target)


def test_configs_round_trip_through_a_dict_and_ignore_scan_fields():
  for config in (CNN(channels=(3, 5), hidden=9, connect_dim=4), MLP(hidden=(12, 6))):
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
    assert models.config_from_dict(record) == config
    assert config.replace(scan_method="parallel", scan_unroll=True) == config
    assert models.model_family(config) == config.family
  mamba = models.ModelConfig(d_model=8, n_layers=1, d_state=2)
  assert models.config_from_dict(vars(mamba)) == mamba
  with pytest.raises(ValueError, match="family 'rnn' is unknown"):
    models.config_from_dict({"family": "rnn"})


def test_forward_shapes_features_and_head_name():
  images = jax.random.normal(jax.random.key(1), (3, 12, 12, 2))
  for config in (CNN(image_shape=(12, 12, 2), num_classes=5, hidden=7), MLP((12, 12, 2), 5)):
    params = jax.eval_shape(lambda c=config: models.init_params(c, jax.random.key(0)))
    assert "head" in params  # ensemble weights fold into it
    logits, features = jax.eval_shape(
        lambda p, x, c=config: models.create_model(c).apply({"params": p}, x, return_features=True),
        params,
        images,
    )
    assert logits.shape == (3, 5) and logits.dtype == jax.numpy.float32
    assert features.shape == (3, config.d_model)


# ----------------------------------------------------------------------------
# McNemar and the settings.
# ----------------------------------------------------------------------------


def test_exact_mcnemar_against_a_hand_count():
  labels = np.array([0, 1, 2, 3, 0, 1])
  a = np.array([0, 1, 2, 0, 0, 0])  # wrong on examples 3 and 5
  b = np.array([1, 0, 2, 3, 3, 1])  # wrong on examples 0, 1 and 4
  test = paired.mcnemar_exact(labels, a, b)
  # only A right: examples 0, 1, 4 (b = 3); only B right: 3, 5 (c = 2); n = 5:
  # p = 2 * (C(5,0) + C(5,1) + C(5,2)) / 2**5 = 2 * 16 / 32 = 1.
  assert (test.b, test.c, test.p_value) == (3, 2, 1.0)
  # b = 9, c = 1 -> 2 * (1 + 10) / 1024
  assert paired.binomial_two_sided(9, 1) == pytest.approx(22 / 1024, rel=1e-15)
  assert paired.binomial_two_sided(0, 0) == 1.0
  # two seeds pool their discordant examples: (3, 2) + (3, 2) -> 2 * (1+10+45+120+210+252)/2**10
  pooled = paired.mcnemar_exact([labels, labels], [a, a], [b, b])
  assert (pooled.b, pooled.c) == (6, 4)
  assert pooled.p_value == pytest.approx(2 * 386 / 1024, rel=1e-15)


def _config(**changes):
  import runpy  # pylint: disable=g-import-not-at-top

  config = runpy.run_path(str(REPO / "configs" / "smoke.py"))["get_config"]()
  for key, value in changes.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def test_settings_resolve_the_student_family_and_refuse_bad_choices():
  s = settings.validate_config(_config(**{"model.student_family": "mlp"}))["settings"]
  assert s.ladder == ("mlp_s1", "mlp_s2", "mlp_s3")
  s = settings.validate_config(_config(**{"pkd.ladder": ("s1", "cnn_s2")}))["settings"]
  assert s.ladder == ("s1", "cnn_s2")
  for changes, message in (
      ({"model.student_family": "rnn"}, "model.student_family='rnn' is not valid"),
      ({"pkd.ladder": ("cnn_s9",)}, "unknown size(s) ['cnn_s9']"),
      ({"report.family_rows": ("cnn", "gru")}, "report.family_rows='gru' is not valid"),
      (
          {"report.family_rows": ("cnn",), "pkd.target": "residual"},
          "distils each family from the teacher alone",
      ),
  ):
    with pytest.raises(ValueError) as info:
      settings.validate_config(_config(**changes))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_family_row_plan_skips_the_students_own_family():
  from mamba_pkd import comparisons  # pylint: disable=g-import-not-at-top

  students = [types.SimpleNamespace(size="s1"), types.SimpleNamespace(size="cnn_s2")]
  plan = comparisons.family_row_plan(students, ("cnn", "mlp", "mamba"))
  assert plan == [
      ("cnn", 1, "cnn_s1"),  # student 2 is the CNN of its rung already
      ("mlp", 1, "mlp_s1"),
      ("mlp", 2, "mlp_s2"),
      ("mamba", 2, "s2"),  # the Mamba counterpart of the CNN student
  ]


# ----------------------------------------------------------------------------
# One run through main: a mixed ensemble (s1, cnn_s2) and the family rows.
# ----------------------------------------------------------------------------

FAMILY_FLAGS = (
    '--config.pkd.ladder=("s1","cnn_s2","s3")',  # student 2 is a CNN (mixed ladder)
    '--config.report.family_rows=("mlp",)',  # the CNN rows' plan: test_family_row_plan
    "--config.baselines=False",
)


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
  """A copy of the shared reference run, re-run with the family flags: the teacher and
  student 1 are restored (the family settings change no Mamba stage's fingerprint), then
  student 2 (cnn_s2), mlp_1 and mlp_2 train: three stages."""
  reference = shared_reference_run(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("family") / "run"
  shutil.copytree(reference, workdir)
  flags = (smoke_data_flag(tmp_path_factory), *FAMILY_FLAGS)
  (out,) = smoke_runs(tmp_path_factory, [(workdir, 1, flags)])
  assert out.returncode == 0, out.stderr[-5000:]
  for stage in ("teacher", "student_1_s1_try1"):
    assert f"stage {stage}: already complete, not retrained" in out.stderr
  return workdir


def test_family_rows_match_their_rungs_and_their_predictions(family_run):
  rows, _ = report.read_results(family_run / report.RESULTS_JSON)
  by_name = {r.name: r for r in rows}
  assert by_name["student_2"].size == "cnn_s2"
  family = {r.name: r for r in rows if r.kind == "family"}
  assert sorted(family) == ["mlp_1", "mlp_2"]
  assert [family[n].size for n in ("mlp_1", "mlp_2")] == ["mlp_s1", "mlp_s2"]
  for name, row in family.items():
    student = by_name[f"student_{name.split('_')[1]}"]
    assert abs(row.flops / student.flops - 1) <= 0.10, (name, row.flops, student.flops)
  labels, predictions = report.read_predictions(family_run / report.PREDICTIONS_NPZ)
  for row in rows:
    if row.name in predictions:
      assert np.mean(predictions[row.name] == labels) == pytest.approx(row.accuracy), row.name
  assert {"teacher", "student_1", "prefix_1..2", "mlp_1", "mlp_2"} <= set(predictions)


def test_a_cnn_member_round_trips_through_the_manifest(family_run):
  run = runs.load_run(family_run, with_teacher=False)
  assert [type(m.config) for m in run.students] == [models.ModelConfig, CNN]
  from mamba_pkd import data  # pylint: disable=g-import-not-at-top

  dataset = data.load_dataset(_config().dataset, seed=0)
  logits = np.asarray(runs.ensemble_from_run(run).logits(dataset.x_test))
  _, predictions = report.read_predictions(family_run / report.PREDICTIONS_NPZ)
  np.testing.assert_array_equal(logits.argmax(-1), predictions["prefix_1..2"])


def test_families_summary_of_the_run(family_run, tmp_path):
  seed_dir = tmp_path / "seed_0"
  seed_dir.mkdir()
  for name in (report.RESULTS_JSON, report.PREDICTIONS_NPZ):
    (seed_dir / name).write_bytes((family_run / name).read_bytes())
  summary = families.summarize(families.seed_dirs(tmp_path))
  labels, predictions = report.read_predictions(seed_dir / report.PREDICTIONS_NPZ)
  s1, s2 = summary["rungs"]
  assert (s1["rung"], s2["rung"]) == ("s1", "s2")
  assert sorted(s1["families"]) == ["mamba", "mlp"] and sorted(s2["families"]) == ["cnn", "mlp"]
  assert s2["families"]["cnn"]["row_names"] == ["student_2"] and "mcnemar" not in s2
  assert s1["mcnemar"]["b"] == "mlp"
  test = s1["mcnemar"]
  best = test["b"]
  expected = paired.mcnemar_exact(labels, predictions["student_1"], predictions[f"{best}_1"])
  assert (test["mamba_only_right"], test["other_only_right"]) == (expected.b, expected.c)
  table = families.format_table(summary)
  assert table.count("\n") == 2 + 2 + 2 and f"vs {best}: p = " in table
  # the README block (optional: rendered where the README has its markers) is this table
  families.write_summary(summary, tmp_path / "results" / "families" / "families.json")
  assert render_readme.render_families_table(tmp_path / "results") == table
