"""Analytic FLOPs and parameter counts against XLA and against initialised models."""

import jax
import pytest

from mamba_pkd import flops, ladders, models


@pytest.mark.parametrize(
    "kw",
    [
        dict(d_model=16, n_layers=1, d_state=4),
        dict(d_model=64, n_layers=2, d_state=16, bidirectional=True),
        dict(d_model=24, n_layers=1, d_state=8, connect_dim=8),
        dict(d_model=24, n_layers=1, d_state=8, connect_dim=8, token_features=True),
        dict(d_model=32, n_layers=3, d_state=16, expand=1, d_conv=2),
    ],
)
def test_analytic_flops_agree_with_xla_cost_analysis(kw):
  """Within 8% of XLA's ``flops + transcendentals`` of the sequential-method forward.

  Tolerance: matmuls and convolutions (most of the total) are counted exactly
  the same way; the elementwise chains (SiLU, softplus, RMSNorm, the scan's
  discretisation) depend on how XLA lowers and fuses them, which accounts for
  the last few percent. The images are one patch (L = 1) because XLA's cost
  analysis counts a while-loop body once and, when the loop is unrolled,
  counts work that fusion duplicates into every step; with one step both
  effects vanish, so the comparison is exact about what runs.
  """
  config = models.ModelConfig(image_shape=(8, 8, 3), patch_size=8, **kw)
  analytic = flops.count_flops(config)
  xla = flops.xla_forward_flops(config)["total"]
  assert abs(analytic - xla) / xla < 0.08, (analytic, xla)


def test_matmul_parts_are_exact_for_a_hand_computed_mixer():
  # L = 49 tokens, d = 16, E = 32, N = 4, R = 1, K = 4.
  config = models.ModelConfig(d_model=16, n_layers=1, d_state=4, patch_size=4)
  parts = flops.mixer_flops(config)
  assert parts["in_proj"] == 2 * 49 * 16 * 64  # 100,352
  assert parts["x_proj"] == 2 * 49 * 32 * (1 + 8)  # 28,224
  assert parts["dt_proj"] == 49 * 32 * (2 * 1 + 1)  # 4,704 (matmul + bias)
  assert parts["out_proj"] == 2 * 49 * 32 * 16  # 50,176
  assert parts["conv1d"] == 49 * 32 * (2 * 4 + 1)  # 14,112
  assert parts["scan"] == 49 * 32 * (7 * 4 + 3)  # 48,608
  bidir = flops.mixer_flops(config.replace(bidirectional=True))
  assert bidir["scan"] == 2 * parts["scan"] and bidir["in_proj"] == parts["in_proj"]


def test_whole_model_total_is_a_hand_count():
  """Every part of a 2-block model summed by hand: L = 4 tokens (8x8 image, 4x4 patches),
  d = 8, E = 16, N = 4, R = 1, K = 4, 10 classes, mean pooling, one direction."""
  config = models.ModelConfig(
      image_shape=(8, 8, 1), patch_size=4, d_model=8, n_layers=2, d_state=4, num_classes=10
  )
  mixer = (
      4 * 16 * 9  # conv1d: depthwise MACs (2K) + bias
      + 4 * 16 * 5  # SiLU
      + 2 * 4 * 16 * (1 + 8)  # x_proj -> (dt, B, C)
      + 4 * 16 * 3  # dt_proj: matmul (2R) + bias
      + 4 * 16 * 8  # softplus
      + 4 * 16 * (7 * 4 + 3)  # scan
      + 2 * 4 * 8 * 32  # in_proj -> (x, z)
      + 4 * 16 * 6  # gate: SiLU(z) * y
      + 2 * 4 * 16 * 8  # out_proj
  )
  block = mixer + 4 * 8 * 4 + 4 * 8  # + pre-norm + residual add
  total = (
      2 * block
      + 4 * 8 * (2 * 16 + 1)  # patch embed: matmul + bias
      + 4 * 8  # position embedding
      + 4 * 8 * 4  # final norm
      + 4 * 8  # mean pool
      + 10 * (2 * 8 + 1)  # head
  )
  assert (mixer, total) == (8192, 18122)
  assert flops.count_flops(config) == total
  assert sum(flops.mixer_flops(config).values()) == mixer


def test_connection_counts_by_hand_pooled_and_per_token():
  """The connection of a model with L = 4 tokens (8x8 image, 4x4 patches), d = 8: reading
  pooled features of width 6, one [6 -> 8] projection per image; reading the token states
  of a predecessor of width 3 (connect_dim = 4 x 3 = 12), one [3 -> 8] projection per token."""
  base = models.ModelConfig(image_shape=(8, 8, 1), patch_size=4, d_model=8, n_layers=1, d_state=4)
  plain = flops.count_flops(base)
  pooled = base.replace(connect_dim=6)
  tokens = base.replace(connect_dim=12, token_features=True)
  assert flops.count_flops(pooled) - plain == 2 * 6 * 8 + 8 + 8  # matmul, bias, add
  assert flops.count_flops(tokens) - plain == 4 * (2 * 3 * 8 + 8 + 8)
  assert flops.count_params(pooled) - flops.count_params(base) == 6 * 8 + 8
  assert flops.count_params(tokens) - flops.count_params(base) == 3 * 8 + 8
  for config in (pooled, tokens):
    params = jax.eval_shape(lambda c=config: models.init_params(c, jax.random.key(0)))
    assert models.count_tree_params(params) == flops.count_params(config)


@pytest.mark.parametrize("family, shape", [("mnist", (28, 28, 1)), ("cifar", (32, 32, 3))])
def test_ladder_param_counts_match_initialised_models(family, shape):
  for name, config in ladders.ladder_configs(
      family, image_shape=shape, num_classes=10, bidirectional=True
  ).items():
    params = jax.eval_shape(lambda c=config: models.init_params(c, jax.random.key(0)))
    assert models.count_tree_params(params) == flops.count_params(config), name


@pytest.mark.parametrize("family, shape", [("mnist", (28, 28, 1)), ("cifar", (32, 32, 3))])
def test_ladder_climbs_from_about_one_percent(family, shape):
  sizes = ladders.ladder_configs(family, image_shape=shape, num_classes=10)
  teacher = flops.count_flops(sizes.pop("teacher"))
  pct = [100 * flops.count_flops(c) / teacher for c in sizes.values()]
  assert len(pct) >= 7 and 0.5 <= pct[0] <= 1.5
  ratios = [b / a for a, b in zip(pct, pct[1:])]
  assert all(1.4 <= r <= 2.1 for r in ratios), ratios
