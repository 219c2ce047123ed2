"""experiments/seeds.py on hand-made workdirs: spreads, McNemar pairs and the pairing rules
against hand counts; the report's stored cascade predictions are what the summary reads."""

import json
import pathlib
import sys
import types

import numpy as np
import pytest

from mamba_pkd import anytime, report

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # the scripts, importable by their file names
import seeds  # pylint: disable=g-import-not-at-top,wrong-import-position

N = 10  # test digits per seed; every label is 0, a right answer is class 0, a wrong one 1
FLOPS = {  # row -> (kind, FLOPs); the cascade's FLOPs differ per seed (below)
    "teacher": ("teacher", 1000),
    "student_1": ("student", 10),
    "student_2": ("student", 30),
    "prefix_1..1": ("prefix", 10),
    "prefix_1..2": ("prefix", 40),
    "baseline_1": ("baseline", 10),
    "baseline_2": ("baseline", 30),
    "cnn_1": ("family", 29),
    "cnn_2": ("family", 31),
    "pixel_baseline": ("pixels", 5000),
    "mlp_1": ("family", 500),
    "cascade@2%": ("cascade", None),
}
RIGHT = [  # per seed: row -> the digits it gets right
    {
        "teacher": range(9),
        "student_1": range(6),
        "student_2": range(8),
        "prefix_1..1": range(6),
        "prefix_1..2": (0, 1, 2, 3, 4, 5, 6, 9),
        "baseline_1": (2, 3, 4, 5, 6),
        "baseline_2": range(8),
        "cnn_1": range(10),
        "cnn_2": range(10),
        "pixel_baseline": range(3),
        "mlp_1": range(10),  # only in seed 0: not a row of the summary
        "cascade@2%": (0, 1, 2, 3, 4, 5, 6),
    },
    {
        "teacher": range(10),
        "student_1": range(7),
        "student_2": range(9),
        "prefix_1..1": range(7),
        "prefix_1..2": range(1, 10),
        "baseline_1": range(3, 10),
        "baseline_2": range(1, 9),
        "cnn_1": range(10),
        "cnn_2": range(10),
        "pixel_baseline": range(4),
        "cascade@2%": range(9),
    },
]
CASCADE_FLOPS = (20, 40)  # mean 30: student_2 and baseline_2 (30) are "at least as costly"


def _workdir(root, seed, heldout=None, store_cascade=True):
  """``root/seed_<seed>``: results.json (rows, meta) and predictions.npz written with NumPy."""
  workdir = root / f"seed_{seed}"
  workdir.mkdir(parents=True)
  rows, predictions = [], {}
  for name, right in RIGHT[seed].items():
    kind, flops = FLOPS[name]
    flops = CASCADE_FLOPS[seed] if flops is None else flops
    pred = np.ones(N, np.int64)
    pred[list(right)] = 0
    rows.append(
        report.Row(name, kind, name, 1, flops, flops / 10, np.mean(pred == 0), np.mean(pred == 0))
    )
    if kind != "pixels" and (kind != "cascade" or store_cascade):
      predictions[name] = pred
  meta = {"seed": seed, "dataset": "fake"}
  if heldout is not None:
    meta["heldout_accuracy"] = heldout
  (workdir / report.RESULTS_JSON).write_text(json.dumps(report.results_dict(rows, meta)))
  report.write_predictions(workdir, np.zeros(N, np.int64), predictions)
  return workdir


@pytest.fixture
def two_seeds(tmp_path):
  heldout = {"student_1": 0.9, "student_2": 0.5}  # student_1 is the better on held-out data
  return [_workdir(tmp_path, s, heldout) for s in (0, 1)]


def _test(summary, a, b):
  (t,) = [t for t in summary["tests"] if (t["a"], t["b"]) == (a, b)]
  return t


def test_rows_are_the_ones_of_every_seed_with_mean_and_sample_std(two_seeds):
  summary = seeds.summarize(two_seeds)
  names = [r["name"] for r in summary["rows"]]
  assert names == [n for n in RIGHT[0] if n != "mlp_1"]  # the first seed's order
  by = {r["name"]: r for r in summary["rows"]}
  # student_1: 6/10 and 7/10 -> mean 0.65, sample std sqrt(2 * 0.05**2 / 1)
  assert by["student_1"]["accuracy"]["mean"] == pytest.approx(0.65)
  assert by["student_1"]["accuracy"]["std"] == pytest.approx(0.05 * 2**0.5)
  # the cascade's % teacher FLOPs: 2 and 4 -> mean 3, std sqrt(2)
  assert by["cascade@2%"]["pct_teacher_flops"]["mean"] == pytest.approx(3.0)
  assert by["cascade@2%"]["pct_teacher_flops"]["std"] == pytest.approx(2**0.5)
  assert by["teacher"]["accuracy"]["std"] == pytest.approx(0.05 * 2**0.5)
  assert summary["seeds"] == [0, 1] and summary["cascade_predictions"] == ["stored"] * 2


def test_cascade_is_compared_with_single_models_of_at_least_its_mean_flops(two_seeds):
  summary = seeds.summarize(two_seeds)
  against = [t["b"] for t in summary["tests"] if t["group"] == "cascade"]
  # mean cascade FLOPs 30: teacher 1000, student_2 30, baseline_2 30, cnn_2 31; not the
  # students of 10 or cnn_1 at 29, nor prefixes or the pixel row (not single models)
  assert sorted(against) == ["baseline_2", "cnn_2", "student_2", "teacher"]


def test_mcnemar_counts_are_pooled_over_seeds(two_seeds):
  summary = seeds.summarize(two_seeds)
  # student_1 vs baseline_1, seed 0: only A right on {0, 1}, only B on {6};
  # seed 1: only A on {0, 1, 2}, only B on {7, 8, 9}. Pooled 5 / 4: p = 2 * 256 / 512 -> 1.
  t = _test(summary, "student_1", "baseline_1")
  assert (t["group"], t["a_only_right"], t["b_only_right"]) == ("kd_vs_ce", 5, 4)
  assert t["p_value"] == 1.0 and not t["significant"]
  # per seed: 2 / 1 -> 2 * (1 + 3) / 8 = 1; 3 / 3 -> 1
  assert t["p_value_per_seed"] == [1.0, 1.0]
  assert t["accuracy_diff_mean"] == pytest.approx(((0.6 - 0.5) + (0.7 - 0.7)) / 2)
  # cascade vs cnn_2: cnn_2 is right everywhere; the cascade misses 3 then 1 digits: 0 / 4,
  # p = 2 * 1 / 16
  t = _test(summary, "cascade@2%", "cnn_2")
  assert (t["a_only_right"], t["b_only_right"]) == (0, 4)
  assert t["p_value"] == pytest.approx(2 / 16)
  assert t["p_value_per_seed"] == pytest.approx([2 / 8, 1.0])
  # student_2 vs baseline_2: the same 8 digits in seed 0; seed 1 only A {0}, only B none
  t = _test(summary, "student_2", "baseline_2")
  assert (t["a_only_right"], t["b_only_right"], t["p_value"]) == (1, 0, 1.0)


def test_prefix_against_its_best_member_on_heldout_data(two_seeds):
  summary = seeds.summarize(two_seeds)
  prefix = [t for t in summary["tests"] if t["group"] == "prefix_vs_best"]
  # prefix_1..1 is student_1 itself: no test; prefix_1..2's best member on held-out data is
  # student_1 (0.9 > 0.5) although student_2 is better on test
  assert [(t["a"], t["b"]) for t in prefix] == [("prefix_1..2", "student_1")]
  assert summary["best_member_by"] == "heldout"
  # seed 0: only prefix right {6, 9}, only student_1 none; seed 1: only prefix {7, 8, 9},
  # only student_1 {0}: pooled 5 / 1, p = 2 * (1 + 6) / 64
  assert (prefix[0]["a_only_right"], prefix[0]["b_only_right"]) == (5, 1)
  assert prefix[0]["p_value"] == pytest.approx(14 / 64)


def test_prefix_best_member_falls_back_to_test_accuracy(tmp_path):
  dirs = [_workdir(tmp_path, 0, {"student_1": 0.9, "student_2": 0.5}), _workdir(tmp_path, 1)]
  summary = seeds.summarize(dirs)
  assert summary["best_member_by"] == "test"
  prefix = [t for t in summary["tests"] if t["group"] == "prefix_vs_best"]
  assert [(t["a"], t["b"]) for t in prefix] == [("prefix_1..2", "student_2")]  # 0.85 > 0.65
  assert "highest mean test accuracy (these runs stored no held-out" in seeds.format_table(summary)


def test_cascade_predictions_are_recomputed_only_when_not_stored(tmp_path, monkeypatch):
  stored = _workdir(tmp_path, 0)
  old = _workdir(tmp_path, 1, store_cascade=False)
  calls = []

  def recompute(workdir, labels):
    calls.append(workdir.name)
    pred = np.ones(N, np.int64)
    pred[list(RIGHT[1]["cascade@2%"])] = 0
    return {"cascade@2%": pred}

  monkeypatch.setattr(seeds, "recompute_cascade_predictions", recompute)
  summary = seeds.summarize([stored, old])
  assert calls == ["seed_1"] and summary["cascade_predictions"] == ["stored", "recomputed"]
  assert _test(summary, "cascade@2%", "cnn_2")["b_only_right"] == 4
  # a recomputation that disagrees with the results.json row is an error
  monkeypatch.setattr(seeds, "recompute_cascade_predictions", lambda w, y: {"cascade@2%": y})
  with pytest.raises(ValueError, match="recomputed cascade@2% has test accuracy 1.0"):
    seeds.summarize([old])


def test_report_stores_cascade_predictions_and_the_summary_reads_them(tmp_path, monkeypatch):
  """anytime.cascade_report fills the predictions the run writes into predictions.npz."""
  from mamba_pkd.models import ModelConfig  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  n_val, n_test, k = 60, 40, 5
  val_labels, test_labels = rng.integers(0, k, n_val), rng.integers(0, k, n_test)

  def model(quality, size, d):
    def logits(labels):
      return quality * np.eye(k)[labels] + rng.normal(size=(len(labels), k))

    config = ModelConfig(image_shape=(4, 4, 1), num_classes=k, d_model=d, n_layers=1, patch_size=2)
    return types.SimpleNamespace(
        train_logits=logits(val_labels),
        test_logits=logits(test_labels),
        prefix_scale=1.0,
        config=config,
        size=size,
        name=size,
    )

  report_config = {"cascade_budgets_pct": (50.0, 80.0), "cascade_bootstrap": 0}
  config = types.SimpleNamespace(get=lambda key, default=None: {"report": report_config}.get(key))
  ctx = types.SimpleNamespace(
      dataset=types.SimpleNamespace(y_test=test_labels),
      val_index=np.arange(n_val),
      val_labels=val_labels,
      config=config,
  )
  teacher = model(4.0, "teacher", 16)
  students = [model(q, f"s{j}", 4 * j) for j, q in ((1, 1.0), (2, 2.0))]
  combination = anytime.fit_anytime(ctx, teacher, students)
  predictions = {"teacher": teacher.test_logits.argmax(-1)}
  rows, _ = anytime.cascade_report(ctx, combination, teacher, students, predictions=predictions)
  assert rows and {r.name for r in rows} == set(predictions) - {"teacher"}
  for r in rows:  # each stored prediction is the row's: its accuracy, by hand
    assert np.mean(predictions[r.name] == test_labels) == pytest.approx(r.accuracy)
  workdir = tmp_path / "seed_0"
  workdir.mkdir()
  (workdir / report.RESULTS_JSON).write_text(
      json.dumps(report.results_dict(rows, {"seed": 0, "dataset": "fake"}))
  )
  report.write_predictions(workdir, test_labels, predictions)
  monkeypatch.setattr(seeds, "recompute_cascade_predictions", None)  # must not be called
  run = seeds.read_seed(workdir)
  assert run["cascade_predictions"] == "stored"
  for r in rows:
    np.testing.assert_array_equal(run["predictions"][r.name], predictions[r.name])


def test_table_shows_every_row_and_test(two_seeds, tmp_path):
  summary = seeds.summarize(two_seeds)
  out = seeds.families.write_summary(summary, tmp_path / "s.json")
  assert seeds.main(["table", f"--summary={out}"]) == 0
  table = seeds.format_table(json.loads(out.read_text()))
  assert "| student_1 | student_1 | 65.00 +- 7.07 | 1.00 +- 0.00 |" in table
  assert "| kd_vs_ce | student_1 | baseline_1 | +5.00 | 5 / 4 | 1 (1, 1) | no | 1 |" in table
  assert table.count("\n| cascade |") == 4


def test_run_skips_finished_seeds_and_summarizes(two_seeds, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(seeds.families.subprocess, "run", None)  # no run may start
  out = tmp_path / "out" / "seeds.json"
  assert seeds.main(["run", "--seeds=0,1", f"--root={tmp_path}", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert printed.count("is finished, skipped") == 2
  assert json.loads(out.read_text())["seeds"] == [0, 1]


def test_holm_adjustment_by_hand():
  # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), 0.5
  assert seeds.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
  assert seeds.holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])


def test_a_run_stores_its_cascade_predictions_and_heldout_accuracies(tmp_path_factory):
  """The shared smoke run (made once per session): predictions.npz has every cascade row's
  predictions, their accuracy the row's; meta has each student's held-out accuracy."""
  from conftest import shared_reference_run  # pylint: disable=g-import-not-at-top

  workdir = shared_reference_run(tmp_path_factory)
  rows, meta = report.read_results(workdir / report.RESULTS_JSON)
  labels, predictions = report.read_predictions(workdir / report.PREDICTIONS_NPZ)
  cascades = [r for r in rows if r.kind == "cascade"]
  assert cascades
  for r in cascades:
    assert np.mean(predictions[r.name] == labels) == pytest.approx(r.accuracy), r.name
  students = [r.name for r in rows if r.kind == "student"]
  assert students and set(meta["heldout_accuracy"]) == set(students)
  assert all(0.0 <= a <= 1.0 for a in meta["heldout_accuracy"].values())
  assert seeds.read_seed(workdir)["cascade_predictions"] == "stored"
