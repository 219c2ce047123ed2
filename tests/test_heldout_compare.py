"""experiments/heldout_compare.py's cross-fitting against hand counts: every held-out digit
is scored once per repeat by a fit made on the other half."""

import pathlib
import sys
import types

import numpy as np

from mamba_pkd import models

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # the scripts, importable by their file names
import heldout_compare  # pylint: disable=g-import-not-at-top,wrong-import-position

N, K = 40, 3
LABELS = np.arange(N) % K
SURE = 30  # member 1 is right and sure on the first 30 digits, wrong and unsure on the rest


def _model(logits, d_model):
  config = models.ModelConfig(image_shape=(8, 8, 1), num_classes=K, d_model=d_model, n_layers=1)
  return types.SimpleNamespace(config=config, train_logits=logits, prefix_scale=1.0)


def _members():
  onehot = np.eye(K)[LABELS]
  first = 5.0 * onehot
  first[SURE:] = 0.3 * np.eye(K)[(LABELS[SURE:] + 1) % K]  # unsure and wrong
  return _model(10.0 * onehot, 64), [_model(first, 4), _model(5.0 * onehot, 16)]


def test_out_of_fold_scores_each_digit_once_per_repeat_by_a_fit_on_the_other_half():
  teacher, students = _members()
  flops = [heldout_compare.flops.count_flops(m.config) for m in (*students, teacher)]
  cheap = 100.0 * flops[0] / flops[2]
  both = 100.0 * (flops[0] + flops[1]) / flops[2]
  # The budget fits sending every unsure digit of any half on (10 of 20 at most).
  budget = 1.01 * (cheap + both) / 2
  tight = 0.5 * cheap  # not even member 1 alone fits
  out = heldout_compare.out_of_fold(
      teacher, students, LABELS, [budget, tight], repeats=3, seed=0, teacher_mode="off"
  )
  # A one-member prefix is a temperature: its argmax, digit by digit.
  np.testing.assert_array_equal(out["prefix_correct"][0], np.arange(N) < SURE)
  np.testing.assert_array_equal(out["prefix_correct"][1], np.ones(N))
  # The cascade sends exactly the unsure digits on, whichever half chose the threshold.
  np.testing.assert_array_equal(out["correct"][budget], np.ones(N))
  np.testing.assert_allclose(out["cost"][budget], np.where(np.arange(N) < SURE, cheap, both))
  assert np.all(np.isnan(out["correct"][tight]))
  assert out["nll"].shape == (2, N) and np.all(out["nll"] > 0)
