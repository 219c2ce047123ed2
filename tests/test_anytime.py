"""Per-prefix combination, early-exit thresholds and their accounting (pure, no training)."""

import types

import numpy as np
import pytest

from mamba_pkd import anytime, cascade, combine, ensemble
from mamba_pkd.preprocessing import Preprocessing


def _members(n=400, k=5, qualities=(1.0, 1.5, 2.0), seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = [rng.normal(size=(n, k)) + q * np.eye(k)[labels] for q in qualities]
  return logits, labels


def test_one_member_temperature_is_the_hand_optimum():
  # Two classes, logits (0, 1) everywhere, label 1 on 80% of rows: NLL(v) is minimal
  # where sigmoid(v) = 0.8, i.e. v = 1 / T = log 4.
  logits = np.tile([0.0, 1.0], (100, 1))
  labels = np.array([1] * 80 + [0] * 20)
  assert combine.fit_temperature(logits, labels, init=3.0) == pytest.approx(1 / np.log(4), 1e-4)
  (fit,) = combine.fit_prefixes([logits], labels)
  assert fit.weights == pytest.approx((1.0,)) and fit.temperature == pytest.approx(
      1 / np.log(4), 1e-4
  )


def test_one_member_temperature_matches_a_fine_grid():
  logits, labels = _members(qualities=(2.0,))
  grid = np.linspace(0.2, 5.0, 4801)
  nlls = [combine.nll(logits[0] / t, labels) for t in grid]
  t = combine.fit_temperature(logits[0], labels)
  assert t == pytest.approx(grid[int(np.argmin(nlls))], abs=2e-3)
  assert combine.nll(logits[0] / t, labels) <= min(nlls) + 1e-9


def test_prefixes_are_never_worse_on_heldout():
  logits, labels = _members(qualities=(2.0, 0.0, 1.0, 3.0))  # member 2 is pure noise
  fits = combine.fit_prefixes(logits, labels)
  nlls = [combine.nll(f.logits(logits), labels) for f in fits]
  assert [f.heldout_nll for f in fits] == pytest.approx(nlls, rel=1e-9)
  singles = [combine.fit_scales([m], labels, [1.0])[1] for m in logits]
  for k in range(1, len(logits) + 1):
    assert nlls[k - 1] <= min(singles[:k]) + 1e-9
    if k > 1:
      assert nlls[k - 1] <= nlls[k - 2] + 1e-12
  assert sum(fits[1].weights) == pytest.approx(2.0)
  assert fits[1].weights[1] < 0.05 * fits[1].weights[0]  # the noise member is (nearly) off
  assert np.argmax(fits[3].weights) == 3  # the best member weighs most
  # Better than the run's plain sum at its best scale (the old combination).
  plain = combine.fit_scales([sum(logits)], labels, [1.0])[1]
  assert nlls[3] < plain


@pytest.mark.parametrize("seed", [5, 23, 32])
def test_prefixes_keep_the_heldout_accuracy_of_the_previous_prefix_and_every_member(seed):
  """Members whose NLL fit loses held-out accuracy (these seeds): each prefix is at least
  as accurate as prefix k-1 and as each member alone, and has the lowest NLL of the
  candidates that are (previous prefix, members alone), lower when it lies between."""
  rng = np.random.default_rng(seed)
  n, k = 200, 5
  labels = rng.integers(0, k, n)
  logits = [
      rng.normal(size=(n, k)) * s + q * np.eye(k)[labels]
      for q, s in zip(rng.uniform(0.5, 3, 4), rng.uniform(0.5, 2, 4))
  ]
  fits = combine.fit_prefixes(logits, labels)
  acc = lambda g: float(np.mean(np.argmax(g, -1) == labels))  # noqa: E731
  single_nll = [combine.fit_scales([m], labels, [1.0])[1] for m in logits]
  between = 0
  for j, fit in enumerate(fits):
    g = fit.logits(logits)
    assert fit.heldout_nll == pytest.approx(combine.nll(g, labels), rel=1e-9)
    floor = max(acc(m) for m in logits[: j + 1])
    safe_nll = [single_nll[i] for i in range(j + 1) if acc(logits[i]) >= floor]
    if j:
      previous = fits[j - 1].logits(logits)
      floor = max(floor, acc(previous))
      if acc(previous) >= floor:
        safe_nll.append(fits[j - 1].heldout_nll)
    assert acc(g) >= floor
    assert fit.heldout_nll <= min(safe_nll) + 1e-9
    if "->" in fit.source:
      between += 1
      assert fit.heldout_nll < min(safe_nll) - 1e-6
      unconstrained = combine.fit_scales(logits[: j + 1], labels, [1.0] * (j + 1))[0]
      assert acc(combine.combined(logits[: j + 1], unconstrained)) < floor
  assert between >= 1  # these seeds reach the case where the fit alone would lose accuracy


def test_a_harmful_last_member_falls_back_to_the_previous_prefix():
  logits, labels = _members(qualities=(2.0, 2.0))
  rng = np.random.default_rng(1)
  wrong = 5.0 * np.eye(5)[(labels + 1) % 5] + rng.normal(size=logits[0].shape)
  fits = combine.fit_prefixes(logits + [wrong], labels)  # wrong: only positive weights allowed
  assert fits[2].heldout_nll <= fits[1].heldout_nll + 1e-12
  assert fits[2].source in ("previous", "fit") and fits[2].weights[2] < 1e-2


def test_ece_of_a_hand_case():
  # Two rows at confidence 0.9 (one right, one wrong) and two at ~1.0 (both right).
  logits = np.log([[0.9, 0.1], [0.9, 0.1], [1 - 1e-12, 1e-12], [1 - 1e-12, 1e-12]])
  labels = np.array([0, 1, 0, 0])
  assert combine.ece(logits, labels) == pytest.approx(0.5 * abs(0.5 - 0.9), abs=1e-6)


def _stages(conf, correct_pred, flops):
  conf = np.asarray(conf, np.float64)
  return cascade.Stages(conf, np.asarray(correct_pred), np.cumsum(flops).astype(np.float64))


def test_exit_accounting_by_hand():
  # 3 stages costing 10, 20, 70 (cumulative 10, 30, 100); 4 images.
  st = _stages(
      [[0.9, 0.5, 0.7, 0.2], [0.9, 0.85, 0.6, 0.3], [0.9, 0.9, 0.9, 0.9]],
      [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]],
      [10, 20, 70],
  )
  out = st.outcome(0.8, np.array([1, 1, 1, 0]))
  # exits: image 0 at stage 1 (10), image 1 at 2 (30), images 2, 3 at 3 (100 each)
  assert out["exits"] == [1, 1, 2]
  assert out["mean_flops"] == pytest.approx((10 + 30 + 100 + 100) / 4)
  assert out["accuracy"] == pytest.approx(3 / 4)
  np.testing.assert_array_equal(
      ensemble.exit_flops(np.array([1, 2, 3, 3]), [10, 20, 70]), [10, 30, 100, 100]
  )


def test_thresholds_meet_their_budget_on_heldout_and_are_the_most_accurate():
  logits, labels = _members(qualities=(1.0, 1.5, 2.0, 2.5))
  fits = combine.fit_prefixes(logits, labels)
  comb = combine.Combination(fits)
  stage_logits, _ = cascade.stage_logits(comb, logits)
  st = cascade.Stages.from_logits(stage_logits, [10, 15, 25, 50])
  thresholds, correct, cost = cascade.sweep(st, labels)
  assert np.all(np.diff(cost.mean(1)) >= -1e-9)  # mean FLOPs grow with the threshold
  for budget_pct in (11, 15, 30, 60, 99):
    rule = cascade.choose_rule(st, labels, budget_pct, 100, teacher="off")
    out = st.outcome(rule.threshold, labels)
    assert out["mean_flops"] <= budget_pct + 1e-9
    assert out["accuracy"] == pytest.approx(rule.heldout_accuracy)
    assert 100.0 * out["mean_flops"] / 100 == pytest.approx(rule.heldout_pct_teacher_flops)
    feasible = cost.mean(1) <= budget_pct + 1e-9
    assert rule.heldout_accuracy == pytest.approx(correct.mean(1)[feasible].max())
  assert cascade.choose_rule(st, labels, 9.0, 100) is None  # stage 1 alone costs 10%
  spread = cascade.bootstrap_rule(st, labels, 30, 100, draws=20, test=(st, None, labels))
  assert spread["feasible"] == 20 and len(spread["test_accuracy_p5_p50_p95"]) == 3


class _TableEnsemble(ensemble.Ensemble):
  """Members whose logits are looked up by image id (x[:, 0, 0, 0] = id + 1; 0 = padding)."""

  def __init__(self, tables, flops):
    n, k = tables[0].shape
    self.preprocessing = Preprocessing((1, 1, 1), k, (0.0,), (1.0,))
    self.members = [
        ensemble.Member(f"student_{j + 1}", "s", "s", f, 1, 1) for j, f in enumerate(flops)
    ]
    self.teacher_flops = 1000
    self.prefix_accuracy = [None] * len(tables)
    self.tables, self.seen = tables, [[] for _ in tables]

  def _member_fn(self, j):
    def fn(x):
      ids = x[:, 0, 0, 0].astype(int)
      self.seen[j].extend(int(i) - 1 for i in ids if i > 0)
      return self.tables[j][np.maximum(ids - 1, 0)], np.zeros((len(x), 1), np.float32)

    return fn


def test_cascade_runs_each_member_only_on_unsure_images():
  logits, labels = _members(n=40, qualities=(1.0, 2.0, 3.0))
  comb = combine.Combination(combine.fit_prefixes(logits, labels), teacher_temperature=1.0)
  st = cascade.Stages.from_logits(cascade.stage_logits(comb, logits)[0], [10, 20, 40])
  rule = cascade.CascadeRule(7.0, float(np.median(st.confidence[0])), False, 0.0, 0.0)
  model = _TableEnsemble([f.astype(np.float32) for f in logits], [10, 20, 40])
  x = (np.arange(40, dtype=np.float32) + 1).reshape(40, 1, 1, 1)
  result = cascade.cascade_predict(model, x, comb, rule)
  exits = st.exits(rule.threshold)
  np.testing.assert_array_equal(result.members_used, exits + 1)
  assert sorted(model.seen[0]) == list(range(40))
  assert sorted(model.seen[1]) == sorted(np.nonzero(exits >= 1)[0].tolist())
  assert sorted(model.seen[2]) == sorted(np.nonzero(exits >= 2)[0].tolist())
  assert result.mean_flops == pytest.approx(st.outcome(rule.threshold, labels)["mean_flops"])
  with_teacher = cascade.CascadeRule(7.0, 0.99, True, 0.0, 0.0)
  with pytest.raises(ValueError, match="ends at the teacher"):
    cascade.cascade_predict(model, x, comb, with_teacher)
  result = cascade.cascade_predict(
      model, x, comb, with_teacher, teacher=lambda xs: np.zeros((len(xs), 5))
  )
  assert result.flops.max() == 10 + 20 + 40 + 1000


class _Recorder:
  """Wraps an object and records reads of the named attributes (the test split's)."""

  def __init__(self, inner, watched, log):
    object.__setattr__(self, "_inner", inner)
    object.__setattr__(self, "_watched", watched)
    object.__setattr__(self, "_log", log)

  def __getattr__(self, name):
    if name in self._watched:
      self._log.append(name)
    return getattr(self._inner, name)


def test_fit_and_thresholds_never_read_the_test_split():
  from mamba_pkd.models import ModelConfig  # pylint: disable=g-import-not-at-top

  logits, labels = _members(n=60, qualities=(1.0, 2.0, 3.0))
  rng = np.random.default_rng(0)
  log = []
  watched = ("x_test", "y_test", "num_test", "test_logits", "test_features")
  dataset = types.SimpleNamespace(
      y_train=labels, x_test=rng.random(3), y_test=rng.random(3), num_test=3
  )

  def model(f, size, d):
    config = ModelConfig(image_shape=(4, 4, 1), num_classes=5, d_model=d, n_layers=1, patch_size=2)
    inner = types.SimpleNamespace(
        train_logits=f, test_logits=f[:3], test_features=None, prefix_scale=1.0, config=config
    )
    inner.size, inner.name = size, size
    return _Recorder(inner, watched, log)

  config = types.SimpleNamespace(
      get=lambda key, default=None: {"report": {"cascade_budgets_pct": (50.0, 80.0)}}.get(
          key, default
      )
  )
  ctx = _Recorder(
      types.SimpleNamespace(
          dataset=_Recorder(dataset, watched, log),
          val_index=np.arange(60),
          val_labels=labels,
          config=config,
      ),
      watched,
      log,
  )
  teacher = model(logits[2] * 2, "teacher", 16)
  students = [model(f, f"s{j}", 4 * (j + 1)) for j, f in enumerate(logits)]
  comb = anytime.fit_anytime(ctx, teacher, students)
  assert log == [], f"the fit read the test split: {log}"
  assert len(comb.prefixes) == 3 and set(comb.cascades) == {"50%", "80%"}
  assert comb.teacher_temperature > 0
  # The same combination round-trips through its JSON (the manifest's and the sidecar's).
  again = combine.Combination.from_json(comb.to_json())
  assert again.prefixes[2].weights == pytest.approx(comb.prefixes[2].weights)
  assert again.cascades == comb.cascades
