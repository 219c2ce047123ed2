"""MambaClassifier, ModelConfig validation and exact parameter counts."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_pkd import ensemble, flops, models
from conftest import REPO, jit_apply, user_xla_env

# Hand-computed parameter counts (see the comments; dt_rank = ceil(d_model / 16)).
MNIST_TEACHER = models.ModelConfig(
    image_shape=(28, 28, 1), patch_size=4, d_model=64, n_layers=4, d_state=16, expand=2, d_conv=4
)
# patch conv 16*64 + 64 = 1,088; position 49*64 = 3,136;
# block: in_proj 64*256 = 16,384; conv 4*128 + 128 = 640; x_proj 128*(4 + 32) = 4,608;
#        dt_proj 4*128 + 128 = 640; A_log 128*16 = 2,048; D 128; out_proj 128*64 = 8,192;
#        norm 64 -> 32,704; four blocks 130,816; final norm 64; head 64*10 + 10 = 650.
MNIST_TEACHER_PARAMS = 1_088 + 3_136 + 130_816 + 64 + 650  # 135,754

CIFAR_TINY_BIDIR = models.ModelConfig(
    image_shape=(32, 32, 3),
    patch_size=8,
    d_model=16,
    n_layers=1,
    d_state=4,
    expand=2,
    d_conv=4,
    bidirectional=True,
)
# patch conv 8*8*3*16 + 16 = 3,088; position 16*16 = 256;
# block: in_proj 16*64 = 1,024; per branch conv 4*32 + 32 = 160, x_proj 32*(1 + 8) = 288,
#        dt_proj 1*32 + 32 = 64, A 32*4 = 128, D 32 -> 672, two branches 1,344;
#        out_proj 32*16 = 512; norm 16 -> 2,896; final norm 16; head 16*10 + 10 = 170.
CIFAR_TINY_PARAMS = 3_088 + 256 + 2_896 + 16 + 170  # 6,426


@pytest.mark.parametrize(
    "config, expected",
    [(MNIST_TEACHER, MNIST_TEACHER_PARAMS), (CIFAR_TINY_BIDIR, CIFAR_TINY_PARAMS)],
)
def test_exact_parameter_counts(config, expected):
  assert flops.count_params(config) == expected
  params = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  assert models.count_tree_params(params) == expected


def _tiny(**changes) -> models.ModelConfig:
  """An 8x8 single-channel model with 4x4 patches (4 tokens), d_model 8, one block."""
  fields = dict(
      image_shape=(8, 8, 1),
      patch_size=4,
      d_model=8,
      n_layers=1,
      d_state=2,
      scan_method="sequential",
  )
  return models.ModelConfig(**{**fields, **changes})


def test_classifier_forward_shapes_and_features():
  config = _tiny(n_layers=2)
  params = models.init_params(config, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  logits, features = jit_apply(config)({"params": params}, images, return_features=True)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert features.shape == (3, 8)
  # The head is linear in the pooled features.
  head = params["head"]
  np.testing.assert_allclose(logits, features @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)


def test_fold_weight_scales_logits_not_features():
  config = _tiny()
  params = models.init_params(config, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  apply = jit_apply(config)
  logits, features = apply({"params": params}, images, return_features=True)
  scaled = ensemble.fold_weight(params, 2.5)
  logits2, features2 = apply({"params": scaled}, images, return_features=True)
  np.testing.assert_allclose(logits2, 2.5 * logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(features2, features)
  np.testing.assert_array_equal(
      params["head"]["kernel"], models.init_params(config, jax.random.key(0))["head"]["kernel"]
  )
  with pytest.raises(ValueError, match="no 'head'"):
    ensemble.fold_weight({"layers_0": {}}, 2.0)


def test_connection_reads_previous_features_and_is_frozen():
  config = _tiny(connect_dim=5)
  params = models.init_params(config, jax.random.key(0))
  model = models.create_model(config)
  images = jnp.ones((2, 8, 8, 1))
  prev = jax.random.normal(jax.random.key(2), (2, 5))
  out_a = jit_apply(config)({"params": params}, images, prev)
  out_b = jit_apply(config)({"params": params}, images, prev + 1.0)
  assert not np.allclose(out_a, out_b)
  grad = jax.jit(jax.grad(lambda f: model.apply({"params": params}, images, f).sum()))(prev)
  np.testing.assert_array_equal(grad, 0.0)  # stop_gradient: the previous student stays frozen
  with pytest.raises(ValueError, match="connect_dim=5"):
    model.apply({"params": params}, images)


def test_token_connection_adds_the_projected_states_to_each_token():
  """A model reading its predecessor's token states (``token_features``) equals, image by
  image, the same model without the connection whose position embedding has the projected
  states added token by token (an independent reference: the add happens before the first
  block, in token order); its own features are its final-norm token states, flattened, and
  their mean over tokens is what the head reads."""
  base = _tiny(token_features=True)  # 4 tokens
  config = base.replace(connect_dim=4 * 3)  # a 3-wide predecessor
  params = models.init_params(config, jax.random.key(0))
  params["connect"]["bias"] = jax.random.normal(jax.random.key(3), (8,))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  prev = jax.random.normal(jax.random.key(2), (2, 12))
  logits, feats = jit_apply(config)({"params": params}, images, prev, return_features=True)
  plain = {k: v for k, v in params.items() if k != "connect"}
  w, b = params["connect"]["kernel"], params["connect"]["bias"]
  for i in range(2):
    moved = dict(plain, pos_embed=plain["pos_embed"] + (prev[i].reshape(4, 3) @ w + b)[None])
    want, want_feats = jit_apply(base)({"params": moved}, images[i : i + 1], return_features=True)
    np.testing.assert_allclose(logits[i], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[i], want_feats[0], rtol=1e-5, atol=1e-6)
  assert feats.shape == (2, 4 * 8) and models.feature_width(config) == 32
  # The unconnected token model is the pooled model with wider features.
  pooled = base.replace(token_features=False)
  own = models.init_params(base, jax.random.key(4))
  tok_logits, tok_feats = jit_apply(base)({"params": own}, images, return_features=True)
  pool_logits, pool_feats = jit_apply(pooled)({"params": own}, images, return_features=True)
  np.testing.assert_array_equal(tok_logits, pool_logits)
  np.testing.assert_allclose(tok_feats.reshape(2, 4, 8).mean(1), pool_feats, rtol=1e-6, atol=1e-6)
  model = models.create_model(config)
  grad = jax.jit(jax.grad(lambda f: model.apply({"params": params}, images, f).sum()))(prev)
  np.testing.assert_array_equal(grad, 0.0)  # the predecessor stays frozen
  with pytest.raises(ValueError, match="num_tokens"):
    base.replace(connect_dim=10)  # not 4 tokens x a width


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("d_state", 0, "d_state"),
        ("d_model", -4, "d_model"),
        ("n_layers", 0, "n_layers"),
        ("patch_size", 5, "patch_size=5"),
        ("pool", "max", "pool"),
        ("num_classes", 1, "num_classes"),
        ("dt_rank", 0, "dt_rank"),
        ("scan_method", "magic", "scan_method"),
        ("connect_dim", -1, "connect_dim"),
    ],
)
def test_bad_configs_raise_naming_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    models.ModelConfig(**{field: value})


def test_wrong_image_shape_is_rejected():
  config = models.ModelConfig(image_shape=(8, 8, 1), patch_size=4, d_model=8, n_layers=1, d_state=2)
  params = models.init_params(config, jax.random.key(0))
  with pytest.raises(ValueError, match="images must have shape"):
    models.create_model(config).apply({"params": params}, jnp.zeros((1, 28, 28, 1)))


# Run with XLA's default settings, what a user's run compiles with (conftest's
# user_xla_env; at the suite's level 0 a fused exp rounds differently from an eager one,
# and eager init itself differs from a user's): every leaf of jitted init_params against
# eager Flax init, for the default job's s1 (every Mamba initialiser, both branches, and Flax's Dense/Conv ones). One size,
# as each eager op is a program of its own (~20 s of compiling); checked by hand at this
# level with two seeds: mnist teacher and s1..s5, tiny s1 connected, tiny s3 with "last"
# pooling, cifar s2, cnn_s1, mlp_s3 (the CNN and MLP use Flax's own initialisers); again
# after init_params batched its Threefry hashes (mamba_pkd/batched_threefry.py).
_INIT_CHECK = """
import json
import jax, numpy as np
from mamba_pkd import ladders, models
config = ladders.ladder_configs("mnist", image_shape=(28, 28, 1), num_classes=10)["s1"]
config = config.replace(bidirectional=True)
rng = jax.random.fold_in(jax.random.key(3), 0)
got = jax.tree_util.tree_flatten_with_path(models.init_params(config, rng))[0]
want = jax.tree_util.tree_flatten_with_path(models.eager_init_params(config, rng))[0]
assert [p for p, _ in got] == [p for p, _ in want]
print(json.dumps([jax.tree_util.keystr(p) for (p, a), (_, b) in zip(got, want)
                  if not np.array_equal(np.asarray(a), np.asarray(b))]))
"""


def test_jitted_init_equals_eager_flax_init_bit_for_bit():
  # init_params is one jitted program; eager Flax init (the reference) runs op by op.
  # A rounding difference in any leaf would change every run's numbers.
  proc = subprocess.run(
      [sys.executable, "-c", _INIT_CHECK],
      cwd=REPO,
      env=user_xla_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  differ = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not differ, f"jitted init differs from eager Flax init in {differ}"
