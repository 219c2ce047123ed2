"""mamba_pkd.batched_threefry: the same bits as the function it wraps, in fewer hashes."""

import jax
import jax.numpy as jnp
import numpy as np
from mamba_pkd import batched_threefry as bt
from mamba_pkd import ladders
from mamba_pkd import models


def _draws(key, scale):
  """Draws of every kind a Flax init makes and more: keys derived three levels deep
  (one level from a drawn value), odd and empty shapes, a split, 64-bit-wide bits."""
  a, b = jax.random.split(jax.random.fold_in(key, 7))
  deep = jax.random.fold_in(jax.random.fold_in(a, 1), 2)
  first = jax.random.bits(b, (5,), jnp.uint32)
  dependent = jax.random.fold_in(deep, first[3])  # its message is a drawn value
  return {
      "normal": jax.random.normal(deep, (3, 7)) * scale,
      "uniform": jax.random.uniform(a, (11,), minval=-scale, maxval=scale),
      "truncated": jax.random.truncated_normal(dependent, -2.0, 2.0, (4, 4)),
      "scalar": jax.random.normal(b, ()),
      "empty": jax.random.uniform(deep, (0, 3)),
      "bits": first,
      "bits8": jax.random.bits(dependent, (9,), jnp.uint8),
      "key": jax.random.key_data(dependent),
  }


def _equal(a, b) -> bool:
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_this_jax_has_what_it_needs():
  # Where JAX's internals moved, batched_threefry silently runs the function as it is:
  # correct, but the compile-time saving is gone. This test says so.
  assert bt.active()


def test_same_bits_as_the_plain_function_in_fewer_hashes():
  key = jax.random.key(11)
  want = jax.jit(_draws)(key, 0.5)
  batched = bt.batched_threefry(_draws)
  got = jax.jit(batched)(key, 0.5)
  assert _equal(got, want)
  # 12 hashes when each key operation hashes on its own; batched, one per dependency
  # level: fold_in(key, 7); the split; fold_in(a, 1) with the draws of a and b; fold_in(., 2);
  # the fold_in by a drawn value with the draws of `deep`; the draws of `dependent`.
  assert bt.count_threefry(batched, key, 0.5) == 6


def test_static_arguments_and_a_pytree_result():
  def fun(shape, key):
    return {"x": jax.random.normal(key, shape), "y": [jax.random.uniform(key, shape[:1])]}

  key = jax.random.key(2)
  got = jax.jit(bt.batched_threefry(fun, static_argnums=(0,)), static_argnums=0)((2, 3), key)
  assert _equal(got, jax.jit(fun, static_argnums=0)((2, 3), key))


def test_other_prng_implementations_run_unchanged():
  key = jax.random.key(4, impl="rbg")
  got = jax.jit(bt.batched_threefry(_draws))(key, 1.0)
  assert _equal(got, jax.jit(_draws)(key, 1.0))


def test_a_models_init_hashes_once_per_level():
  # Equality of models.init_params with eager Flax init, bit for bit, is
  # tests/test_models.py's (run with a user's XLA settings); here: the batching is on.
  config = ladders.ladder_configs("tiny", image_shape=(16, 16, 1), num_classes=4)["s1"]
  key = jax.random.key(0)
  batched_init = bt.batched_threefry(models.eager_init_params, static_argnums=(0,))
  plain = bt.count_threefry(lambda k: models.eager_init_params(config, k), key)
  batched = bt.count_threefry(lambda k: batched_init(config, k), key)
  assert plain > 20 and batched == 2, (plain, batched)


def test_functions_with_side_effects_run_unchanged():
  def fun(key):
    x = jax.random.normal(jax.random.fold_in(key, 1), (3,))
    jax.debug.callback(lambda v: None, x)
    return x

  key = jax.random.key(1)
  batched = bt.batched_threefry(fun)
  assert bt.count_threefry(batched, key) == bt.count_threefry(fun, key) == 2
  assert _equal(jax.jit(batched)(key), jax.jit(fun)(key))
