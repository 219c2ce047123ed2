"""ONNX lowering of the members and the onnxruntime ensemble (mamba_pkd.edge)."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the edge extra (onnx) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the edge extra (onnxruntime) is not installed")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from mamba_pkd.edge import onnx_lower, runtime  # noqa: E402  pylint: disable=g-import-not-at-top
from mamba_pkd.models import ModelConfig, create_model, init_params  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4

# (name, config fields): uni/bidirectional, mean/last pooling, 1-2 layers,
# patch sizes 1..4, 16 tokens (dual form under "auto") and 36 (recurrent).
CASES = {
    "uni_mean_1layer_p4": dict(image_shape=(16, 16, 1), patch_size=4, n_layers=1, d_model=8),
    "bi_last_2layers_p2": dict(
        image_shape=(8, 8, 3), patch_size=2, n_layers=2, bidirectional=True, pool="last"
    ),
    "bi_mean_1layer_p1_36tokens": dict(
        image_shape=(6, 6, 1), patch_size=1, n_layers=1, bidirectional=True, d_state=3
    ),
    "uni_last_2layers_p3": dict(
        image_shape=(9, 9, 2), patch_size=3, n_layers=2, pool="last", d_model=12, d_conv=3
    ),
}


def _config(**fields) -> ModelConfig:
  base = dict(num_classes=5, d_model=8, d_state=4, scan_method="sequential")
  return ModelConfig(**{**base, **fields})


def _random_params(config: ModelConfig, seed: int) -> dict:
  """Initial params plus noise, so that A, D, dt bias and the norms are not at their init."""
  params = init_params(config, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.device_get(jax.tree.unflatten(tree, noisy))


def _jax_forward(config, params, x, prev=None):
  model = create_model(config)
  fn = jax.jit(lambda p, x, prev: model.apply({"params": p}, x, prev, return_features=True))
  logits, features = fn(params, x, prev)
  return np.asarray(logits), np.asarray(features)


def _run(proto, x, prev=None):
  session = runtime.load_session(proto.SerializeToString())
  feeds = {"x": x} | ({"prev_features": prev} if prev is not None else {})
  return session.run(None, feeds)


@pytest.fixture(scope="module")
def cases():
  """Per case: config, params, inputs [5, H, W, C] and the JAX outputs (computed once)."""
  out = {}
  for i, (name, fields) in enumerate(CASES.items()):
    config = _config(**fields)
    params = _random_params(config, i)
    x = np.random.default_rng(i).standard_normal((5, *config.image_shape)).astype(np.float32)
    out[name] = (config, params, x, _jax_forward(config, params, x))
  return out


@pytest.mark.parametrize("form", ["dual", "recurrent", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_onnx_matches_jax(cases, name, form):
  config, params, x, (ref_logits, ref_features) = cases[name]
  proto = onnx_lower.member_to_onnx(config, params, scan_form=form)
  onnx.checker.check_model(proto, full_check=True)
  assert proto.opset_import[0].version == onnx_lower.OPSET
  batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
  assert batch_dim.dim_param == "b"
  logits, features = _run(proto, x)
  assert logits.dtype == np.float32 and logits.shape == ref_logits.shape
  np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
  np.testing.assert_allclose(features, ref_features, atol=TOL, rtol=0)
  np.testing.assert_array_equal(logits.argmax(-1), ref_logits.argmax(-1))
  # The same graph at batch 1 (symbolic batch).
  one, _ = _run(proto, x[:1])
  np.testing.assert_allclose(one, ref_logits[:1], atol=TOL, rtol=0)


def test_auto_scan_form_by_length():
  short = _config(image_shape=(16, 16, 1), patch_size=4)
  long = _config(image_shape=(8, 8, 1), patch_size=1)
  assert onnx_lower.resolve_scan_form(short) == "dual"
  assert onnx_lower.resolve_scan_form(long) == "recurrent"
  wide = _config(image_shape=(16, 16, 1), patch_size=4, d_model=96, d_state=16)
  assert onnx_lower.resolve_scan_form(wide.replace(bidirectional=True)) == "recurrent"
  with pytest.raises(ValueError, match="scan_form"):
    onnx_lower.resolve_scan_form(short, "loop")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """Two members, the second connected to the first; their ONNX files and JAX outputs."""
  tmp_path = tmp_path_factory.mktemp("chain")
  first = _config(image_shape=(8, 8, 1), patch_size=2, bidirectional=True)
  second = _config(image_shape=(8, 8, 1), patch_size=2, d_model=6, connect_dim=first.d_model)
  p1, p2 = _random_params(first, 7), _random_params(second, 8)
  x = np.random.default_rng(3).standard_normal((6, 8, 8, 1)).astype(np.float32)
  l1, f1 = _jax_forward(first, p1, x)
  l2, _ = _jax_forward(second, p2, x, f1)
  paths = [
      onnx_lower.save(onnx_lower.member_to_onnx(c, p), tmp_path / f"member_{j}.onnx")
      for j, (c, p) in enumerate([(first, p1), (second, p2)], start=1)
  ]
  meta = [
      {"name": "student_1", "flops": 1000, "connect_dim": 0, "prefix_scale": 1.0},
      {"name": "student_2", "flops": 3000, "connect_dim": first.d_model, "prefix_scale": 2.0},
  ]
  preprocessing = {"image_shape": [8, 8, 1], "num_classes": 5, "mean": [0.5], "std": [0.25]}
  return paths, meta, preprocessing, x, [l1, l1 + l2]


def test_connected_member_has_second_input(chain):
  paths = chain[0]
  proto = onnx.load(str(paths[1]))
  assert [i.name for i in proto.graph.input] == ["x", "prev_features"]
  assert [o.name for o in proto.graph.output] == ["logits", "features"]


_BLOCKED_CHILD = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax"):
          raise ImportError(f"{name} is blocked in this test")
        return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from mamba_pkd.edge.runtime import OnnxEnsemble

    work = sys.argv[1]
    spec = json.load(open(f"{work}/spec.json"))
    x = np.load(f"{work}/x.npy")
    ens = OnnxEnsemble(spec["paths"], spec["meta"], spec["preprocessing"])
    res = ens.cascade(x, thresholds=spec["threshold"], normalized=True)
    np.savez(
        f"{work}/child.npz",
        f1=ens.logits(x, 1, normalized=True),
        f2=ens.logits(x, 2, normalized=True),
        cascade_logits=res.logits,
        members_used=res.members_used,
        mean_flops=res.mean_flops,
    )
    assert not any(m.split(".")[0] in ("jax", "jaxlib", "flax") for m in sys.modules)
    print("child ok")
    """)


def test_runtime_without_jax_matches_parent(tmp_path, chain):
  paths, meta, preprocessing, x, (f1, f2) = chain
  ens = runtime.OnnxEnsemble(paths, meta, preprocessing)
  np.testing.assert_allclose(ens.logits(x, 1, normalized=True), f1, atol=TOL, rtol=0)
  np.testing.assert_allclose(ens.logits(x, normalized=True), f2, atol=TOL, rtol=0)
  chunked = runtime.OnnxEnsemble(paths, meta, preprocessing, max_batch=4)  # 6 images: 4 + 2
  np.testing.assert_allclose(chunked.logits(x, normalized=True), f2, atol=TOL, rtol=0)
  threshold = float(np.median(runtime.confidence(f1, 1.0)))  # about half the images stop
  parent = ens.cascade(x, thresholds=threshold, normalized=True)
  np.save(tmp_path / "x.npy", x)
  spec = {
      "paths": [str(p) for p in paths],
      "meta": meta,
      "preprocessing": preprocessing,
      "threshold": threshold,
  }
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  child = subprocess.run(
      [sys.executable, "-c", _BLOCKED_CHILD, str(tmp_path)],
      capture_output=True,
      text=True,
      env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
      timeout=120,
      check=False,
  )
  assert child.returncode == 0, child.stderr[-3000:]
  got = np.load(tmp_path / "child.npz")
  np.testing.assert_allclose(got["f1"], f1, atol=TOL, rtol=0)
  np.testing.assert_allclose(got["f2"], f2, atol=TOL, rtol=0)
  np.testing.assert_array_equal(got["cascade_logits"], parent.logits)
  np.testing.assert_array_equal(got["members_used"], parent.members_used)
  assert float(got["mean_flops"]) == parent.mean_flops
  # The median threshold stops some images after member 1 and sends the rest on to member 2.
  assert sorted(np.unique(parent.members_used)) == [1, 2]


def _selector_member(k: int, j: int) -> onnx.ModelProto:
  """A hand-made member: x [b, 1, 3, k] -> logits = x[:, 0, j, :] (features the same)."""
  from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top

  nodes = [
      helper.make_node("Gather", ["x", "row"], ["picked"], axis=2),  # [b, 1, k]
      helper.make_node("Reshape", ["picked", "shape"], ["logits"]),
      helper.make_node("Identity", ["logits"], ["features"]),
  ]
  inits = [
      onnx.numpy_helper.from_array(np.array(j, np.int64), "row"),
      onnx.numpy_helper.from_array(np.array([-1, k], np.int64), "shape"),
  ]
  graph = helper.make_graph(
      nodes,
      f"selector_{j}",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 3, k])],
      [
          helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", k]),
          helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", k]),
      ],
      inits,
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  return model


def test_cascade_accounting_by_hand():
  # Member j's logits for image i are x[i, 0, j]; three members with 10, 100
  # and 1000 FLOPs: prefixes cost 10, 110, 1110.
  big = [9.0, 0.0, 0.0]
  flat = [0.0, 0.0, 0.0]
  x = np.array(
      [
          [[big, flat, flat]],  # confident after member 1
          [[flat, big, flat]],  # confident after member 2
          [[flat, flat, flat]],  # never confident: all 3
          [[flat, flat, big]],  # confident only at 3 (the last prefix always stops)
          [[big, big, big]],  # confident after member 1
      ],
      np.float32,
  )
  members = [_selector_member(3, j).SerializeToString() for j in range(3)]
  meta = [{"flops": f} for f in (10, 100, 1000)]
  prep = {"image_shape": [1, 3, 3], "num_classes": 3, "mean": [0, 0, 0], "std": [1, 1, 1]}
  ens = runtime.OnnxEnsemble(members, meta, prep)
  batches = []
  for j, session in enumerate(ens.sessions):

    class Counting:  # records how many images each member ran on

      def __init__(self, inner, j=j):
        self.inner, self.j = inner, j

      def run(self, names, feeds):
        batches.append((self.j, len(feeds["x"])))
        return self.inner.run(names, feeds)

    ens.sessions[j] = Counting(session)
  res = ens.cascade(x, thresholds=0.9, normalized=True)
  np.testing.assert_array_equal(res.members_used, [1, 2, 3, 3, 1])
  assert batches == [(0, 5), (1, 3), (2, 2)]
  assert res.mean_flops == pytest.approx((10 + 110 + 1110 + 1110 + 10) / 5)
  assert runtime.cascade_mean_flops([1, 2, 3, 3, 1], [10, 100, 1000]) == res.mean_flops
  np.testing.assert_array_equal(res.classes, [0, 0, 0, 0, 0])
  np.testing.assert_allclose(res.logits[4], [9.0, 0.0, 0.0])  # stopped at F_1
  np.testing.assert_allclose(res.logits[3], [9.0, 0.0, 0.0])  # F_3 = 0 + 0 + big
  # Per-prefix thresholds: nothing stops after member 1, everything after member 2.
  res = ens.cascade(x, thresholds=[1.1, 0.0], normalized=True)
  np.testing.assert_array_equal(res.members_used, [2, 2, 2, 2, 2])
  assert res.mean_flops == pytest.approx(110)
  # No early exit (threshold above any confidence) runs every member on every image.
  assert ens.cascade(x, thresholds=2.0, normalized=True).mean_flops == pytest.approx(1110)


def test_confidence_rules():
  logits = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]], np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(runtime.confidence(logits), p[:, 0] - p[:, 1], rtol=1e-6)
  np.testing.assert_allclose(runtime.confidence(logits, rule="max_prob"), p.max(-1), rtol=1e-6)
  # The scale sharpens the softmax: margin at scale 2 = margin of 2 * logits.
  np.testing.assert_allclose(
      runtime.confidence(logits, 2.0), runtime.confidence(2 * logits), rtol=1e-6
  )
  with pytest.raises(ValueError, match="rule"):
    runtime.confidence(logits, rule="entropy")


def test_int8_runs(tmp_path, cases):
  config, params, x, (ref_logits, _) = cases["bi_last_2layers_p2"]
  src = onnx_lower.save(onnx_lower.member_to_onnx(config, params), tmp_path / "m.onnx")
  dst = onnx_lower.quantize_int8(src, tmp_path / "m.int8.onnx")
  prep = {
      "image_shape": list(config.image_shape),
      "num_classes": 5,
      "mean": [0] * 3,
      "std": [1] * 3,
  }
  ens = runtime.OnnxEnsemble([dst], [{"flops": 1}], prep)
  logits = ens.logits(x, normalized=True)
  assert logits.shape == ref_logits.shape and logits.dtype == np.float32
  assert np.isfinite(logits).all()
  nodes = onnx.load(str(dst)).graph.node
  assert any(n.op_type == "MatMulInteger" for n in nodes)  # the head
  # The scan's 0/1 matrices (and so the step sizes) stay float32.
  for node in nodes:
    if any(i.startswith("dual_") for i in node.input):
      assert node.op_type == "MatMul", node


def test_normalize_uint8_matches_formula():
  prep = {"image_shape": [1, 3, 2], "num_classes": 2, "mean": [0.5], "std": [0.25]}
  ens = runtime.OnnxEnsemble([_selector_member(2, 0).SerializeToString()], [{"flops": 1}], prep)
  pixels = np.array([0, 255] * 3, np.uint8).reshape(1, 1, 3, 2)
  np.testing.assert_allclose(ens.normalize(pixels)[0, 0, 0], [-2.0, 2.0])
  np.testing.assert_allclose(ens.normalize(pixels / 255.0)[0, 0, 0], [-2.0, 2.0])
  with pytest.raises(ValueError, match="shape"):
    ens.normalize(np.zeros((1, 2, 2, 1), np.uint8))
