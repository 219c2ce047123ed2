"""Threefry hashes of a traced function batched into a few calls: same values, faster compile.

This module owns :func:`batched_threefry`, used by :func:`mamba_pkd.models.init_params`.

Why: a Flax init derives one key per parameter (``fold_in`` with each name on its path)
and draws each parameter from its own key, and every ``fold_in`` and every draw is a
Threefry-2x32 hash of its own in the compiled program (the MNIST teacher: 46 + 27, a
one-layer tiny student 16 + 9). XLA compiles each hash separately: they were 75-85% of
compiling a model's initialisation (measured 2026-12-03, XLA's defaults, 2-core CPU:
MNIST teacher 5.1-6.0 s with the hashes, 1.4 s with them stubbed out; student s1 4.4 s
and 0.7 s).

How: the function is traced to a jaxpr, nested ``jit`` calls are inlined, and each
``random_fold_in`` / ``random_bits`` / ``random_split`` on a Threefry key is replaced by
its implementation (JAX's own ``threefry2x32`` PRNG functions, traced on the key's raw
data), which hashes with the ``threefry2x32`` primitive. The equations are then evaluated
in waves: everything that can run runs; the hashes whose inputs are ready wait and are
computed together, as one ``threefry2x32`` over their concatenated inputs. A key
derivation ``d`` levels deep needs ``d + 1`` waves; a Flax init derives each parameter's
key from the root in one level, so the MNIST teacher's 73 hashes become 2. The hash is
elementwise in its four inputs, so batching changes no bit of any result
(tests/test_batched_threefry.py, and tests/test_models.py against Flax's eager init).

It relies on JAX internals (the ``threefry2x32`` primitive and the key primitives'
names); where they are not as expected, or a key is not a Threefry key, the function
runs unchanged (:func:`active` says which).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

try:  # JAX internals: the key primitives and the hash primitive
  from jax._src import core as _core
  from jax._src.random import threefry2x32 as _threefry_mod

  _THREEFRY_P = _threefry_mod.threefry2x32_p
except (ImportError, AttributeError):  # another JAX layout: run the function as it is
  _core = None
  _THREEFRY_P = None

_KEY_OPS = ("random_fold_in", "random_bits", "random_split")
_INLINED = ("jit", "pjit")  # the jit primitive's name in newer and older JAX


def active() -> bool:
  """Whether this JAX has the internals :func:`batched_threefry` needs."""
  return _THREEFRY_P is not None


def batched_threefry(fun: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
  """``fun`` with its Threefry hashes computed a few at a time (bit for bit the same).

  Meant to be called under ``jax.jit`` (the waves then compile as one program); the
  arguments other than ``static_argnums`` and the results are pytrees of arrays, keys
  included. For pure functions: one with side effects (callbacks, prints) runs
  unchanged. Nested ``jit``s are inlined, their sharding annotations with them.
  """

  @functools.wraps(fun)
  def wrapped(*args):
    if not active():
      return fun(*args)
    static = {i: args[i] for i in static_argnums}
    dynamic = [a for i, a in enumerate(args) if i not in static]

    def call(*dyn):
      it = iter(dyn)
      return fun(*(static[i] if i in static else next(it) for i in range(len(args))))

    closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*dynamic)
    if closed.effects:  # evaluation in waves reorders equations: pure functions only
      return fun(*args)
    graph = _Graph()
    in_refs = [graph.value(x) for x in jax.tree.leaves(dynamic)]
    try:
      out_refs = graph.inline(closed, in_refs)
    except _Unsupported:
      return fun(*args)
    graph.run()
    return jax.tree.unflatten(jax.tree.structure(out_shape), [graph.values[r] for r in out_refs])

  return wrapped


def count_threefry(fun: Callable, *args) -> int:
  """How many Threefry hashes tracing ``fun(*args)`` gives, nested jits included: its
  ``threefry2x32`` equations plus its key operations (each one hash when lowered)."""
  return _count(jax.make_jaxpr(fun)(*args).jaxpr)


def _count(jaxpr) -> int:
  own = sum(e.primitive is _THREEFRY_P or e.primitive.name in _KEY_OPS for e in jaxpr.eqns)
  return own + sum(_count(sub) for sub in _core.subjaxprs(jaxpr))


class _Unsupported(Exception):
  """A key operation this module does not rewrite (the function then runs unchanged)."""


@dataclasses.dataclass
class _Node:
  prim: Any
  params: dict
  ins: list  # refs
  outs: list  # refs


class _Graph:
  """Flat equations over integer refs, evaluated in waves (see the module docstring)."""

  def __init__(self):
    self.values: dict[int, Any] = {}
    self.nodes: list[_Node] = []
    self._next = 0

  def ref(self) -> int:
    self._next += 1
    return self._next

  def value(self, x) -> int:
    r = self.ref()
    self.values[r] = x
    return r

  def inline(self, closed, in_refs: list) -> list:
    """Appends ``closed``'s equations (nested jits inlined, key ops expanded); its out refs."""
    env = {}

    def read(v):
      if isinstance(v, _core.Literal):
        return self.value(v.val)
      return env[v]

    for v, c in zip(closed.jaxpr.constvars, closed.consts):
      env[v] = self.value(c)
    for v, r in zip(closed.jaxpr.invars, in_refs):
      env[v] = r
    for eqn in closed.jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in _INLINED and isinstance(eqn.params.get("jaxpr"), _core.ClosedJaxpr):
        outs = self.inline(eqn.params["jaxpr"], ins)
      elif name in _KEY_OPS:
        outs = self.inline(_expansion(eqn), ins)
      else:
        outs = [self.ref() for _ in eqn.outvars]
        self.nodes.append(_Node(eqn.primitive, eqn.params, ins, outs))
      for v, r in zip(eqn.outvars, outs):
        if not isinstance(v, _core.DropVar):
          env[v] = r
    return [read(v) for v in closed.jaxpr.outvars]

  def run(self) -> None:
    pending = self.nodes
    while pending:
      waiting, hashes = [], []
      for node in pending:  # in trace order, so one pass runs every ready chain
        if not all(r in self.values for r in node.ins):
          waiting.append(node)
        elif node.prim is _THREEFRY_P:
          hashes.append(node)
        else:
          self._bind(node)
      if hashes:
        self._hash(hashes)
      elif len(waiting) == len(pending):
        raise RuntimeError("batched_threefry: equations wait on values nothing computes")
      pending = waiting

  def _bind(self, node: _Node) -> None:
    params = node.prim.get_bind_params(node.params)
    subfuns = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
      subfuns, params = params
    out = node.prim.bind(*subfuns, *(self.values[r] for r in node.ins), **params)
    for r, x in zip(node.outs, out if node.prim.multiple_results else (out,)):
      self.values[r] = x

  def _hash(self, nodes: list[_Node]) -> None:
    """One ``threefry2x32`` for all ``nodes``: inputs broadcast, flattened and concatenated."""
    shapes = [np.broadcast_shapes(*(np.shape(self.values[r]) for r in n.ins)) for n in nodes]
    sizes = [int(np.prod(s)) for s in shapes]
    cols = [
        jnp.concatenate(
            [jnp.broadcast_to(self.values[n.ins[i]], s).reshape(-1) for n, s in zip(nodes, shapes)]
        )
        for i in range(4)
    ]
    out0, out1 = _THREEFRY_P.bind(*cols)
    offsets = np.cumsum([0] + sizes)
    for n, s, lo, hi in zip(nodes, shapes, offsets[:-1], offsets[1:]):
      self.values[n.outs[0]] = out0[lo:hi].reshape(s)
      self.values[n.outs[1]] = out1[lo:hi].reshape(s)


def _expansion(eqn):
  """The jaxpr of a key op written with its PRNG implementation on the key's raw data."""
  key_aval = eqn.invars[0].aval
  impl = getattr(key_aval.dtype, "_impl", None)
  if impl is None or impl.name != "threefry2x32" or key_aval.shape != ():
    raise _Unsupported(f"{eqn.primitive.name} on {key_aval}")
  args = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
  return _expansion_of(eqn.primitive.name, tuple(sorted(eqn.params.items())), impl, args)


@functools.lru_cache(maxsize=256)
def _expansion_of(name: str, params: tuple, impl, args: tuple):
  """Cached by op and shapes: a model's ~50 ``fold_in``s share one jaxpr."""
  params = dict(params)

  def op(key, *rest):
    raw = jax.random.key_data(key)
    if name == "random_fold_in":
      return jax.random.wrap_key_data(impl.fold_in(raw, rest[0]), impl=impl.name)
    if name == "random_bits":
      return impl.random_bits(raw, params["bit_width"], params["shape"])
    return jax.random.wrap_key_data(impl.split(raw, params["shape"]), impl=impl.name)

  return jax.make_jaxpr(op)(*args)
