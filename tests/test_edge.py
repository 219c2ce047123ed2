"""ONNX lowering of the members, the ONNX export bundle and the onnxruntime ensemble (mamba_pkd.edge).

References: in-process JAX (``model.apply`` per member, chained by hand, and the
in-process ensemble of a real smoke run with ``cascade.cascade_predict``); the
bundle is run in a child process where importing jax fails.
"""

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

from mamba_pkd import cascade, combine, export, predict, runs  # noqa: E402
from mamba_pkd.edge import onnx_export, onnx_lower, runtime  # noqa: E402  pylint: disable=g-import-not-at-top
from mamba_pkd.models import ModelConfig, create_model, init_params  # noqa: E402
from conftest import shared_reference_run, smoke_data  # noqa: E402

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
  rng = np.random.default_rng(seed + 100)  # NumPy: no XLA program per leaf shape
  return jax.tree.map(
      lambda x: (np.asarray(x) + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), params
  )


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
def chain():
  """Two members, the second connected to the first, and their JAX outputs (hand-chained)."""
  first = _config(image_shape=(8, 8, 1), patch_size=2, bidirectional=True)
  second = _config(image_shape=(8, 8, 1), patch_size=2, d_model=6, connect_dim=first.d_model)
  p1, p2 = _random_params(first, 7), _random_params(second, 8)
  x = np.random.default_rng(3).standard_normal((6, 8, 8, 1)).astype(np.float32)
  l1, f1 = _jax_forward(first, p1, x)
  l2, _ = _jax_forward(second, p2, x, f1)
  return [first, second], [p1, p2], x, [l1, l1 + l2]


def test_a_cnn_member_is_refused_in_one_line_before_anything_is_written(tmp_path):
  """The lowering covers Mamba members only: a CNN student (issue 16's families) stops the
  export with one line naming it and the valid format, and no file is written."""
  from mamba_pkd import cnn_mlp, ensemble, preprocessing  # pylint: disable=g-import-not-at-top

  mamba = _config(image_shape=(8, 8, 1), patch_size=2)
  cnn = cnn_mlp.CNNConfig(image_shape=(8, 8, 1), num_classes=5, channels=(2, 4), kernel=3, hidden=6)
  fields = dict(stage="s", size="s1", flops=1, num_params=1, d_model=8, connect_dim=0)
  members = [
      ensemble.Member(name="student_1", config=mamba, params=_random_params(mamba, 0), **fields),
      ensemble.Member(name="student_2", config=cnn, params={}, **fields),
  ]
  out = tmp_path / "bundle"
  with pytest.raises(ValueError) as raised:
    onnx_export.export_onnx(
        members,
        out,
        preprocessing=preprocessing.Preprocessing(
            image_shape=(8, 8, 1), num_classes=5, mean=(0.0,), std=(1.0,)
        ),
        teacher_flops=10,
    )
  assert str(raised.value) == (
      "student_2 is a cnn student: the ONNX lowering covers Mamba members only; "
      "export this run with --format=stablehlo"
  )
  assert not out.exists()
  # A member that hands on token states (pkd.connect_tokens) is refused the same way.
  tokens = mamba.replace(token_features=True)
  members = [ensemble.Member(name="student_1", config=tokens, params={}, **fields)]
  with pytest.raises(ValueError, match="^student_1 hands on or reads token-level hidden states"):
    onnx_export.export_onnx(members, out, preprocessing=None, teacher_flops=10)
  assert not out.exists()


def test_connected_member_has_second_input(chain):
  (first, second), (p1, p2), x, (f1, f2) = chain
  proto = onnx_lower.member_to_onnx(second, p2)
  assert [i.name for i in proto.graph.input] == ["x", "prev_features"]
  assert [o.name for o in proto.graph.output] == ["logits", "features"]
  _, features = _run(onnx_lower.member_to_onnx(first, p1), x)
  logits, _ = _run(proto, x, features)
  np.testing.assert_allclose(logits, f2 - f1, atol=TOL, rtol=0)


@pytest.mark.parametrize("form", ["dual", "recurrent"])
def test_prefix_graph_is_the_chained_sum(chain, form):
  configs, params, x, (f1, f2) = chain
  for k, ref in ((1, f1), (2, f2)):
    proto = onnx_lower.prefix_to_onnx(configs[:k], params[:k], scan_form=form)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    (logits,) = _run(proto, x)
    np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)
  with pytest.raises(ValueError, match="previous features"):
    onnx_lower.prefix_to_onnx(configs[1:], params[1:])


@pytest.mark.parametrize("form", ["dual", "recurrent"])
def test_int8_quantises_the_right_hand_weights(tmp_path, cases, form):
  config, params, x, (ref_logits, _) = cases["bi_last_2layers_p2"]
  proto = onnx_lower.member_to_onnx(config, params, scan_form=form)
  src = onnx_export.save(proto, tmp_path / "m.onnx")
  dst = onnx_export.quantize_int8(src, tmp_path / "m.int8.onnx")
  logits, _ = runtime.load_session(dst).run(None, {"x": x})
  assert logits.shape == ref_logits.shape and logits.dtype == np.float32
  np.testing.assert_array_equal(logits.argmax(-1), ref_logits.argmax(-1))
  assert 0 < np.abs(logits - ref_logits).max() < 0.5  # quantised: close, not equal
  nodes = onnx.load(str(dst)).graph.node
  # The head; in the recurrent form also x_proj of each of the 2 layers.
  expected = 1 + (config.n_layers if form == "recurrent" else 0)
  assert sum(n.op_type == "MatMulInteger" for n in nodes) == expected
  # The scan's 0/1 and permutation matrices (and so the step sizes) stay float32.
  for node in nodes:
    if any(i.startswith(("dual_", "flip")) for i in node.input):
      assert node.op_type == "MatMul", node


# ----------------------------------------------------------------------------
# A real smoke run (tests/conftest.py's shared reference run) exported to ONNX.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """(workdir, ONNX bundle with int8 files, normalised test images, JAX ensemble of the run)."""
  workdir = shared_reference_run(tmp_path_factory)
  out = tmp_path_factory.mktemp("onnx_bundle")
  cli = [sys.executable, "-m", "mamba_pkd.export", f"--workdir={workdir}", f"--out={out}"]
  done = subprocess.run(
      cli + ["--format=onnx", "--int8"], capture_output=True, text=True, timeout=300, check=False
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "ONNX opset 17, checked with onnx.checker" in done.stdout
  run = runs.load_run(workdir, with_teacher=True)
  with np.load(smoke_data(tmp_path_factory)) as d:
    x = run.preprocessing.normalize(d["x_test"])
  return workdir, out, x, runs.ensemble_from_run(run)


def _median_rule(jax_ens, x) -> dict:
  """A cascade rule whose threshold is the median stage-1 confidence on ``x`` (half go on).

  The smoke run's stored rules send every test image out at stage 1; this one
  exercises every later stage (and the teacher, when the bundle has it).
  """
  first = jax_ens.combination.prefix_logits([jax_ens.member_forward(0, x)[0]], 1)
  threshold = float(np.median(combine.max_probability(first)))
  teacher = jax_ens.teacher_fn is not None and jax_ens.combination.teacher_temperature is not None
  return cascade.CascadeRule(50.0, threshold, teacher, 0.0, 0.0).to_json()


def test_onnx_bundle_sidecar_and_checked_files(smoke):
  workdir, out, _, jax_ens = smoke
  meta = json.loads((out / export.SIDECAR).read_text())
  assert meta["artifact"] == "onnx" and meta["onnx"]["opset"] == 17
  n = jax_ens.num_members
  assert meta["onnx"]["prefix_files"] == [f"prefix_{k}.onnx" for k in range(1, n + 1)]
  assert [m["flops"] for m in meta["members"]] == [m.flops for m in jax_ens.members]
  manifest = json.loads((workdir / "ensemble.json").read_text())
  assert meta["combination"] == manifest["combination"]  # weights, temperatures, thresholds
  assert meta["preprocessing"] == manifest["preprocessing"]
  files = [m["file"] for m in meta["members"]] + meta["onnx"]["prefix_files"]
  files += meta["onnx"]["int8_files"] + ([meta["teacher"]["file"]] if meta["teacher"] else [])
  assert len(files) == 4 * n + (2 if meta["teacher"] else 0)
  for name in files:
    proto = onnx.load(str(out / name))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17


_BLOCKED_CHILD = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax"):
          raise ImportError(f"{name} is blocked in this test")
        return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from mamba_pkd import cascade, predict
    from mamba_pkd.edge.runtime import load_onnx_export

    bundle, work = sys.argv[1], sys.argv[2]
    x = np.load(f"{work}/x.npy")
    model = load_onnx_export(bundle)
    int8 = load_onnx_export(bundle, int8=True)
    out = {}
    for k in range(1, model.num_members + 1):
      out[f"prefix_{k}"] = model.logits(x, num_members=k, normalized=True)
      out[f"int8_{k}"] = int8.logits(x, num_members=k, normalized=True)
    labels = [label for label, rule in model.combination.cascades.items() if rule]
    for label in labels:
      res = model.cascade(x, label, normalized=True)
      out[f"used_{label}"], out[f"logits_{label}"] = res.members_used, res.logits
    median = json.load(open(f"{work}/rule.json"))
    res = cascade.cascade_predict(model, x, model.combination, median, teacher=model.teacher_fn)
    out["used_median"], out["logits_median"] = res.members_used, res.logits
    np.savez(f"{work}/child.npz", **out)
    args = [f"{work}/x.npz", f"--model={bundle}", "--runtime=onnx", f"--budget={labels[0]}"]
    assert predict.main(args + [f"--output_json={work}/cascade.json"]) == 0
    assert predict.main([f"{work}/x.npz", f"--model={bundle}", "--runtime=onnx",
                         "--max_flops_pct=100", "--max_latency_ms=1000",
                         f"--output_json={work}/prefix.json"]) == 0
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "jaxlib", "flax"})
    assert not heavy, heavy
    print("child ok", json.dumps(labels))
    """)


def test_onnx_bundle_without_jax_matches_jax(smoke, tmp_path):
  """Every prefix within 1e-4 of JAX with the same argmax; the cascade's exits identical."""
  _, out, x, jax_ens = smoke
  np.save(tmp_path / "x.npy", x)
  pixels = np.clip(
      np.round((x * jax_ens.preprocessing.std[0] + jax_ens.preprocessing.mean[0]) * 255), 0, 255
  ).astype(np.uint8)
  np.savez(tmp_path / "x.npz", x=pixels)
  median = _median_rule(jax_ens, x)
  (tmp_path / "rule.json").write_text(json.dumps(median))
  child = subprocess.run(
      [sys.executable, "-c", _BLOCKED_CHILD, str(out), str(tmp_path)],
      capture_output=True,
      text=True,
      env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
      timeout=300,
      check=False,
  )
  assert child.returncode == 0, child.stderr[-3000:]
  labels = json.loads(child.stdout.split("child ok ")[1])
  assert labels  # the smoke run stores at least one feasible cascade rule
  got = np.load(tmp_path / "child.npz")
  for k in range(1, jax_ens.num_members + 1):
    ref = jax_ens.logits(x, num_members=k, normalized=True)
    np.testing.assert_allclose(got[f"prefix_{k}"], ref, atol=TOL, rtol=0)
    np.testing.assert_array_equal(got[f"prefix_{k}"].argmax(-1), ref.argmax(-1))
    assert np.isfinite(got[f"int8_{k}"]).all()
  for label in labels:
    rule = cascade.rule_for_budget_text(jax_ens.combination, label, jax_ens.teacher_flops)
    ref = cascade.cascade_predict(jax_ens, x, jax_ens.combination, rule, teacher=jax_ens.teacher_fn)
    np.testing.assert_array_equal(got[f"used_{label}"], ref.members_used)
    np.testing.assert_allclose(got[f"logits_{label}"], ref.logits, atol=TOL, rtol=0)
  ref = cascade.cascade_predict(jax_ens, x, jax_ens.combination, median, teacher=jax_ens.teacher_fn)
  np.testing.assert_array_equal(got["used_median"], ref.members_used)
  np.testing.assert_allclose(got["logits_median"], ref.logits, atol=TOL, rtol=0)
  assert len(np.unique(ref.members_used)) > 1  # images leave at several stages
  # predict --runtime=onnx on the uint8 pixels: the same exits as the JAX cascade on them.
  printed = json.loads((tmp_path / "cascade.json").read_text())
  rule = cascade.rule_for_budget_text(jax_ens.combination, labels[0], jax_ens.teacher_flops)
  ref = cascade.cascade_predict(
      jax_ens,
      jax_ens.preprocessing.normalize(pixels),
      jax_ens.combination,
      rule,
      teacher=jax_ens.teacher_fn,
  )
  assert [p["class"] for p in printed["predictions"]] == ref.classes.tolist()
  assert printed["mean_flops"] == pytest.approx(ref.mean_flops)
  prefix = json.loads((tmp_path / "prefix.json").read_text())
  assert prefix["prefix"] == jax_ens.num_members and "1" in prefix["latencies_ms"]


def test_cascade_runs_members_only_on_unsure_images(smoke):
  _, out, x, jax_ens = smoke
  model = runtime.load_onnx_export(out)
  rule = _median_rule(jax_ens, x)
  seen = []
  forward, teacher = model.member_forward, model.teacher_fn
  model.member_forward = lambda j, xs, prev=None: (seen.append((j, len(xs))), forward(j, xs, prev))[
      1
  ]
  if teacher is not None:
    model.teacher_fn = lambda xs: (seen.append(("teacher", len(xs))), teacher(xs))[1]
  res = cascade.cascade_predict(model, x, model.combination, rule, teacher=model.teacher_fn)
  used, n = res.members_used, model.num_members
  expected = [(j, int((used > j).sum())) for j in range(n) if (used > j).any()]
  expected += [("teacher", int((used > n).sum()))] if (used > n).any() else []
  assert seen == expected
  assert len(seen) > 1  # some images go on past stage 1
  member_flops = [m.flops for m in model.members] + [model.teacher_flops]
  cumulative = np.cumsum(member_flops)
  assert res.mean_flops == pytest.approx(cumulative[used - 1].mean())  # hand count


def test_runtime_mismatch_errors(smoke, tmp_path, capsys):
  workdir, out, _, _ = smoke
  np.savez(tmp_path / "x.npz", x=np.zeros((1, 16, 16, 1), np.uint8))
  assert predict.main([str(tmp_path / "x.npz"), f"--model={workdir}", "--runtime=onnx"]) == 2
  assert "--format=onnx" in capsys.readouterr().err
  assert predict.main([str(tmp_path / "x.npz"), f"--model={out}", "--runtime=jax"]) == 2
  assert "--runtime=onnx" in capsys.readouterr().err
  assert predict.main([str(tmp_path / "x.npz"), f"--model={workdir}", "--int8"]) == 2
  assert "--int8 runs the int8 files of an ONNX export" in capsys.readouterr().err
  with pytest.raises(ValueError, match="holds a onnx export"):
    export.load_export(out)
