"""Tests for mamba_pkd.export, mamba_pkd.runs and mamba_pkd.predict.

A small run directory is written without training, through the same writers
``mamba_pkd.main`` uses (``checkpoints.StageCheckpointer.mark_complete`` and
``manifest.write_manifest``): a tiny ensemble of three *connected* students
(student j reads student j-1's features) with random weights, student 2
weighted 2.5. The reference for the exported StableHLO and for the in-process
runtime is a hand-chained ``model.apply`` per member (not the package's
chaining code). The smoke run in test_pkd exports a real run, with its dataset
file moved away.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import jit_apply

from mamba_pkd import checkpoints, ensemble, export, flops, manifest, models, predict, runs
from mamba_pkd.models import init_params
from mamba_pkd.ladders import ladder_configs
from mamba_pkd.preprocessing import Preprocessing

H, W, C, K = 16, 16, 1, 4
ACCEPTED = ("s1", "s2", "s3")
WEIGHTS = (1.0, 2.5, 1.0)
SCALES = (1.0, 0.4, 1.0)
PREPROCESSING = Preprocessing((H, W, C), K, (0.3,), (0.2,))
# The exported functions use the "parallel" scan, the in-process reference the
# run's "sequential" one: the same math in another order, float32 rounding only.
ATOL, RTOL = 2e-5, 1e-5


def _member(name, stage, size, cfg, params=None, weight=1.0, scale=1.0):
  return ensemble.Member(
      name=name,
      stage=stage,
      size=size,
      flops=flops.count_flops(cfg),
      num_params=flops.count_params(cfg),
      d_model=models.feature_width(cfg),
      connect_dim=cfg.connect_dim,
      weight=weight,
      prefix_scale=scale,
      config=cfg,
      params=params,
  )


def _write_run(workdir: pathlib.Path, tokens: bool = False) -> dict:
  """A finished ensemble-mode run with connected students s1, s2, s3 (random weights);
  with ``tokens`` each student reads its predecessor's token states (pkd.connect_tokens)."""
  sizes = ladder_configs("tiny", image_shape=(H, W, C), num_classes=K, scan_method="sequential")
  teacher, students, reference = None, [], {"configs": [], "params": []}
  prev = None
  for seed, size in enumerate(("teacher",) + ACCEPTED):
    cfg = sizes[size]
    if tokens and size != "teacher":
      cfg = cfg.replace(token_features=True)
    if prev is not None and size != "teacher":
      cfg = cfg.replace(connect_dim=models.feature_width(prev))
    stage = "teacher" if size == "teacher" else f"student_{seed}_{size}_try1"
    params = jax.tree.map(
        np.asarray, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))
    )
    with checkpoints.StageCheckpointer(checkpoints.stage_dir(workdir, stage)) as ckpt:
      ckpt.mark_complete(params, {"size": size, "seed": seed})  # f_k, weight not folded
    if size == "teacher":
      teacher = _member("teacher", stage, size, cfg)
      continue
    k = seed
    students.append(
        _member(f"student_{k}", stage, size, cfg, weight=WEIGHTS[k - 1], scale=SCALES[k - 1])
    )
    reference["configs"].append(cfg)
    reference["params"].append(params)
    prev = cfg
  manifest.write_manifest(
      workdir,
      mode="ensemble",
      dataset={"name": "gone.npz", "seed": 0, "num_train": 1, "num_heldout": 1, "num_test": 1},
      preprocessing=PREPROCESSING,
      teacher=teacher,
      students=students,
      stop="ladder exhausted",
      test_accuracy={f"student_{k}": 0.5 + 0.1 * k for k in range(1, 4)},
  )
  reference["teacher"] = teacher.config
  return reference


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  reference = _write_run(workdir)
  return workdir, reference


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory):
  workdir, _ = run_dir
  out = tmp_path_factory.mktemp("bundle")
  path, members = export.export_run(workdir, out)
  assert [m.size for m in members] == list(ACCEPTED)
  return out


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (6, H, W, C), dtype=np.uint8)


def _reference_prefixes(reference, x):
  """[F_1, F_2, F_3] on normalised x: each member applied by hand, features chained by hand."""
  f, prev = [], None
  for cfg, params, weight in zip(reference["configs"], reference["params"], WEIGHTS):
    logits, prev = jit_apply(cfg)({"params": params}, x, prev, return_features=True)
    f.append(weight * np.asarray(logits, np.float64))
  return [f[0], f[0] + f[1], f[0] + f[1] + f[2]]


@pytest.fixture(scope="module")
def reference_logits(run_dir, images):
  workdir, reference = run_dir
  x = PREPROCESSING.normalize(images)
  return x, _reference_prefixes(reference, x)


def test_load_run_rebuilds_members_from_the_manifest(run_dir, images, reference_logits):
  workdir, reference = run_dir
  run = runs.load_run(workdir)
  assert [m.size for m in run.students] == list(ACCEPTED)
  assert [m.stage for m in run.students] == [
      f"student_{k}_{s}_try1" for k, s in enumerate(ACCEPTED, start=1)
  ]
  assert [m.config for m in run.students] == reference["configs"]
  assert [m.config.connect_dim for m in run.students] == [0, 4, 6]  # d_model of s1, s2
  assert [m.weight for m in run.students] == list(WEIGHTS)
  np.testing.assert_allclose(
      run.students[1].params["head"]["kernel"], 2.5 * reference["params"][1]["head"]["kernel"]
  )  # the manifest's weight folded into the head; the checkpoint holds f_2
  np.testing.assert_array_equal(
      run.students[0].params["head"]["kernel"], reference["params"][0]["head"]["kernel"]
  )
  assert run.prefix_accuracy == pytest.approx([0.6, 0.7, 0.8])
  assert run.preprocessing == PREPROCESSING  # from the manifest: no dataset is read
  # The in-process runtime chains and sums like the hand-chained reference.
  x, prefixes = reference_logits
  in_process = runs.ensemble_from_run(run)
  for k in (1, 2, 3):
    np.testing.assert_allclose(
        in_process.logits(x, num_members=k, normalized=True), prefixes[k - 1], atol=ATOL, rtol=RTOL
    )


def test_token_connected_run_exports_and_runs_like_hand_chained_apply(images, tmp_path):
  """Students that read their predecessor's token states (16 tokens x d_model): the manifest
  records the flattened widths, and the export's prefixes and the in-process runtime equal
  the hand-chained reference."""
  workdir = tmp_path / "run"
  reference = _write_run(workdir, tokens=True)
  run = runs.load_run(workdir)
  assert [m.config.connect_dim for m in run.students] == [0, 16 * 4, 16 * 6]  # s1, s2 tokens
  assert [m.d_model for m in run.students] == [16 * 4, 16 * 6, 16 * 8]
  assert all(m.config.token_features for m in run.students)
  x = PREPROCESSING.normalize(images)
  prefixes = _reference_prefixes(reference, x)
  in_process = runs.ensemble_from_run(run)
  export.export_run(workdir, tmp_path / "bundle")
  exported = export.load_export(tmp_path / "bundle")
  for k in (1, 2, 3):
    np.testing.assert_allclose(
        in_process.logits(x, num_members=k, normalized=True), prefixes[k - 1], atol=ATOL, rtol=RTOL
    )
  np.testing.assert_allclose(exported(images), prefixes[2], atol=ATOL, rtol=RTOL)


def test_loading_an_export_imports_no_training_library(bundle, images):
  code = (
      "import sys, numpy as np\n"
      "from mamba_pkd.export import load_export\n"
      f"model = load_export({str(bundle)!r})\n"
      f"logits = model(np.load({str(bundle / 'x.npy')!r}))\n"
      "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
      "{'flax', 'optax', 'orbax', 'tensorflow_datasets', 'tensorflow'})\n"
      "print('heavy', heavy, 'shape', logits.shape)\n"
  )
  np.save(bundle / "x.npy", images)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"heavy [] shape ({len(images)}, {K})" in out.stdout


def test_missing_or_old_manifest_is_one_clear_error(run_dir, tmp_path):
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(manifest.ManifestError, match="older version of mamba_pkd, before run"):
    runs.load_run(tmp_path)
  (tmp_path / manifest.FILENAME).write_text(json.dumps({"format": manifest.FORMAT, "version": 0}))
  with pytest.raises(manifest.ManifestError, match="version 0, this code reads"):
    manifest.read_manifest(tmp_path)
  with pytest.raises(manifest.ManifestError, match="does not exist; pass the --workdir"):
    manifest.read_manifest(tmp_path / "missing")


def test_exported_prefix_matches_in_process_model(bundle, images, reference_logits):
  x, prefixes = reference_logits
  loaded = export.load_export(bundle)
  # Whole prefix (prefix.stablehlo), two batch sizes through one artifact.
  np.testing.assert_allclose(loaded(images), prefixes[2], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(loaded(images[:2]), prefixes[2][:2], atol=ATOL, rtol=RTOL)
  # Shorter prefix: the member files composed (features passed between members).
  np.testing.assert_allclose(loaded(images, num_members=2), prefixes[1], atol=ATOL, rtol=RTOL)
  # All cumulative logits at once.
  cumulative = loaded.prefix_logits(images)
  assert cumulative.shape == (6, 3, K)
  for k in range(3):
    np.testing.assert_allclose(cumulative[:, k], prefixes[k], atol=ATOL, rtol=RTOL)
  # Float pixels in [0, 1] are the same picture as uint8 pixels.
  np.testing.assert_allclose(
      loaded(images.astype(np.float32) / 255.0), prefixes[2], atol=ATOL, rtol=RTOL
  )
  np.testing.assert_allclose(loaded(x, normalized=True), prefixes[2], atol=ATOL, rtol=RTOL)


def test_sidecar_records_preprocessing_and_costs(bundle, run_dir):
  workdir, reference = run_dir
  meta = json.loads((bundle / export.SIDECAR).read_text())
  run = runs.load_run(workdir, with_teacher=False)
  assert meta["preprocessing"]["image_shape"] == [H, W, C]
  assert meta["preprocessing"]["num_classes"] == K
  assert meta["preprocessing"]["mean"] == pytest.approx(list(run.preprocessing.mean))
  member_flops = [flops.count_flops(c) for c in reference["configs"]]
  assert [m["flops"] for m in meta["members"]] == member_flops
  assert meta["flops"] == sum(member_flops)
  assert meta["teacher_flops"] == flops.count_flops(reference["teacher"])
  assert [m["size"] for m in meta["members"]] == list(ACCEPTED)
  assert meta["scan_method"] == "parallel" and meta["platforms"] == ["cpu"]


def test_normalize_uint8_and_float_against_hand_formula():
  pre = Preprocessing((2, 2, 3), 10, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
  pixels = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3) * 20
  expected = (pixels.astype(np.float64) / 255.0 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]
  np.testing.assert_allclose(pre.normalize(pixels), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pre.normalize(pixels / 255.0), expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[N, 2, 2, 3\].*got \(1, 3, 3, 3\)"):
    pre.normalize(np.zeros((1, 3, 3, 3), np.uint8))
  with pytest.raises(ValueError, match=r"have 1 channel\(s\); the model takes 3 \(RGB\)"):
    pre.normalize(np.zeros((1, 2, 2, 1), np.uint8))
  with pytest.raises(ValueError, match=r"images is empty \(shape \(0, 2, 2, 3\)\)"):
    pre.normalize(np.zeros((0, 2, 2, 3), np.uint8))
  bad = pixels / 255.0
  bad[0, 1, 0, 2] = np.nan
  with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\) \(first at index \(0, 1, 0, 2\)"):
    pre.normalize(bad)
  bad[0, 1, 0, 2] = np.inf
  with pytest.raises(ValueError, match="NaN/Inf"):
    pre.normalize(bad, normalized=True)
  with pytest.raises(ValueError, match=r"float images must be pixels in \[0, 1\]"):
    pre.normalize(pixels.astype(np.float32))
  with pytest.raises(ValueError, match="uint8 pixels"):
    pre.normalize(pixels.astype(np.int64))


def test_budget_picks_largest_fitting_prefix(bundle):
  loaded = export.load_export(bundle)
  costs = loaded.costs()
  flops_each = [m.flops for m in loaded.members]
  teacher = loaded.teacher_flops
  pct = [100.0 * sum(flops_each[:k]) / teacher for k in (1, 2, 3)]
  assert [c.pct_teacher_flops for c in costs] == pytest.approx(pct)
  between = lambda a, b: (a + b) / 2  # noqa: E731
  pick = lambda **kw: ensemble.largest_prefix_within(costs, **kw)[0]  # noqa: E731
  assert pick(max_flops_pct=between(pct[1], pct[2])) == 2
  assert pick(max_flops_pct=between(pct[0], pct[1])) == 1
  assert pick(max_flops_pct=200.0) == 3
  assert pick(max_flops=sum(flops_each[:2])) == 2  # the limit is inclusive
  assert pick(max_flops=sum(flops_each[:2]) - 1) == 1
  with pytest.raises(
      ensemble.BudgetError,
      match=rf"cheapest, prefix 1..1 \(s1\): " rf"{flops_each[0]:,} FLOPs/image",
  ):
    pick(max_flops_pct=pct[0] / 2)
  # Latency: measured from k = 1 up, stopping at the first prefix over budget.
  fake = {1: 1.0, 2: 2.0, 3: 5.0}
  calls = []
  timer = lambda k: calls.append(k) or fake[k]  # noqa: E731
  k, measured = ensemble.largest_prefix_within(costs, max_latency_ms=3.0, latency_ms=timer)
  assert (k, calls, measured) == (2, [1, 2, 3], fake)
  calls.clear()
  k, _ = ensemble.largest_prefix_within(
      costs, max_latency_ms=3.0, latency_ms=timer, max_flops_pct=between(pct[0], pct[1])
  )
  assert (k, calls) == (1, [1])  # FLOPs limit first: prefixes 2, 3 are never timed
  with pytest.raises(ensemble.BudgetError, match=r"takes 1 ms per call"):
    ensemble.largest_prefix_within(costs, max_latency_ms=0.5, latency_ms=timer)
  assert ensemble.parse_flops("25%") == (None, 25.0)
  assert ensemble.parse_flops("150k") == (150e3, None)
  assert ensemble.parse_flops("2.5e6") == (2.5e6, None)
  with pytest.raises(ValueError, match="max_flops='-3'"):
    ensemble.parse_flops("-3")


def test_prefix_scale_is_kept_and_calibrates_the_margins(bundle, run_dir, reference_logits):
  workdir, _ = run_dir
  x, prefixes = reference_logits
  scales = [m.prefix_scale for m in runs.load_run(workdir, with_teacher=False).students]
  assert scales == [1.0, 0.4, 1.0]
  loaded = export.load_export(bundle)
  assert [m.prefix_scale for m in loaded.members] == scales
  result = predict.anytime_predict(loaded, x, num_members=2)
  np.testing.assert_allclose(result.margins, predict.softmax_margin(0.4 * prefixes[1]), atol=1e-5)


def test_softmax_margin_hand_values():
  logits = np.array([[0.0, np.log(3.0)], [1.0, 1.0], [0.0, 0.0]])
  logits = np.concatenate([logits, np.full((3, 1), -np.inf)], axis=1)
  np.testing.assert_allclose(predict.softmax_margin(logits), [0.5, 0.0, 0.0], atol=1e-7)


def test_early_exit_uses_fewer_members_on_confident_images(bundle, reference_logits):
  x, prefixes = reference_logits
  loaded = export.load_export(bundle)
  full = predict.anytime_predict(loaded, x)
  np.testing.assert_array_equal(full.members_used, 3)
  np.testing.assert_allclose(full.logits, prefixes[2], atol=ATOL, rtol=RTOL)
  # Margins of the calibrated prefixes (prefix_scale 1, 0.4, 1 in the run's decisions).
  margins = [predict.softmax_margin(c * f) for c, f in zip([1.0, 0.4, 1.0], prefixes)]
  threshold = float(np.median(margins[0]))
  expected_used = np.where(margins[0] >= threshold, 1, np.where(margins[1] >= threshold, 2, 3))
  assert 0 < np.sum(expected_used == 1) < len(x)  # some images stop early, some do not
  result = predict.anytime_predict(loaded, x, confidence=threshold)
  np.testing.assert_array_equal(result.members_used, expected_used)
  for i, used in enumerate(expected_used):
    np.testing.assert_allclose(result.logits[i], prefixes[used - 1][i], atol=ATOL, rtol=RTOL)
  # The budget caps the members too: at most 2 here.
  capped = predict.anytime_predict(loaded, x, num_members=2, confidence=threshold)
  np.testing.assert_array_equal(capped.members_used, np.minimum(expected_used, 2))


def test_predict_cli_budget_early_exit_and_workdir(
    bundle, run_dir, images, tmp_path, capsys, reference_logits
):
  workdir, _ = run_dir
  _, prefixes = reference_logits
  np.savez(tmp_path / "batch.npz", images=images)
  loaded = export.load_export(bundle)
  pct = [c.pct_teacher_flops for c in loaded.costs()]
  budget = f"--max_flops_pct={(pct[1] + pct[2]) / 2:.4f}"
  out_json = tmp_path / "pred.json"
  assert (
      predict.main(
          [
              f"--model={bundle}",
              budget,
              "--confidence=1.0",
              f"--output_json={out_json}",
              str(tmp_path / "batch.npz"),
          ]
      )
      == 0
  )
  printed = capsys.readouterr().out
  assert "using prefix 1..2 (s1+s2)" in printed
  assert "the next, prefix 1..3" in printed
  result = json.loads(out_json.read_text())
  assert result["prefix"] == 2
  assert [p["members"] for p in result["predictions"]] == [2] * len(images)  # margin < 1
  np.testing.assert_array_equal([p["class"] for p in result["predictions"]], prefixes[1].argmax(-1))
  # The workdir runs the same students in-process and gives the same answer.
  out_wd = tmp_path / "pred_wd.json"
  assert (
      predict.main(
          [f"--model={workdir}", budget, f"--output_json={out_wd}", str(tmp_path / "batch.npz")]
      )
      == 0
  )
  in_process = json.loads(out_wd.read_text())["predictions"]
  assert [(p["class"], p["members"]) for p in in_process] == [
      (p["class"], p["members"]) for p in result["predictions"]
  ]
  np.testing.assert_allclose(
      [p["margin"] for p in in_process], [p["margin"] for p in result["predictions"]], atol=1e-5
  )


def test_predict_cli_errors(bundle, tmp_path, capsys):
  loaded = export.load_export(bundle)
  cheapest = loaded.costs()[0]
  np.savez(tmp_path / "bad_shape.npz", x=np.zeros((2, 8, 8, 1), np.uint8))
  np.savez(tmp_path / "bad_key.npz", pixels=np.zeros((2, H, W, C), np.uint8))
  (tmp_path / "junk.png").write_text("not an image")
  nan = np.full((2, H, W, C), 0.5, np.float32)
  nan[1, 3, 4, 0] = np.nan
  np.savez(tmp_path / "nan.npz", x=nan)
  np.savez(tmp_path / "empty.npz", x=np.zeros((0, H, W, C), np.uint8))
  np.savez(tmp_path / "rgb.npz", x=np.zeros((2, H, W, 3), np.uint8))
  cases = [
      ([str(tmp_path / "nan.npz")], "1 NaN/Inf value(s) (first at index (1, 3, 4, 0), image 1)"),
      ([str(tmp_path / "empty.npz")], "images is empty (shape (0, 16, 16, 1))"),
      ([str(tmp_path / "rgb.npz")], "has shape (2, 16, 16, 3); the model takes [N, 16, 16, 1]"),
      (
          [f"--max_flops_pct={cheapest.pct_teacher_flops / 2}", "a.png"],
          f"the cheapest, prefix 1..1 (s1): {cheapest.flops:,} FLOPs/image",
      ),
      ([str(tmp_path / "bad_shape.npz")], "has shape (2, 8, 8, 1); the model takes [N, 16, 16, 1]"),
      ([str(tmp_path / "bad_key.npz")], "has no array named 'x' or 'images'"),
      ([str(tmp_path / "junk.png")], "cannot read image"),
      (["--confidence=1.5", "a.png"], "--confidence=1.5 must be in (0, 1]"),
      ([], "no images given"),
  ]
  for args, message in cases:
    assert predict.main([f"--model={bundle}", *args]) == 2, args
    assert message in capsys.readouterr().err, args
  assert predict.main([f"--model={tmp_path}", "a.png"]) == 2
  assert "neither an export bundle" in capsys.readouterr().err


def test_png_reading_converts_channels_and_resizes(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rgb = np.zeros((32, 32, 3), np.uint8)
  rgb[...] = (200, 100, 50)
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  notes = []
  gray = predict.read_image_file(tmp_path / "rgb.png", (16, 16, 1), notes=notes)
  assert gray.shape == (16, 16, 1) and gray.dtype == np.uint8
  # ITU-R 601-2 luma, as Pillow's "L" conversion: 0.299 R + 0.587 G + 0.114 B.
  np.testing.assert_allclose(gray, round(0.299 * 200 + 0.587 * 100 + 0.114 * 50), atol=1)
  assert notes == [f"{tmp_path / 'rgb.png'}: resized from 32x32 to 16x16 (the model's input size)"]
  Image.fromarray(rgb[:16, :16, 0]).save(tmp_path / "gray.png")
  color = predict.read_image_file(tmp_path / "gray.png", (16, 16, 3))
  np.testing.assert_array_equal(color, 200)  # gray replicated to RGB, no resize
  notes.clear()
  predict.read_image_file(tmp_path / "gray.png", (16, 16, 1), notes=notes)
  assert notes == []


def test_selection_errors(run_dir, tmp_path):
  workdir, _ = run_dir
  run = runs.load_run(workdir, with_teacher=False)
  with pytest.raises(ValueError, match="not a classifier alone; export the prefix 1..2"):
    runs.select_members(run, student=2)
  with pytest.raises(ValueError, match=r"valid prefixes 1..3"):
    runs.select_members(run, prefix=4)
  assert [m.size for m in runs.select_members(run, student=1)] == ["s1"]
  with pytest.raises(ValueError, match="scan_method='fused' cannot be exported"):
    export.export_run(workdir, tmp_path / "x", scan_method="fused")
  with pytest.raises(ValueError, match="does not exist"):
    runs.load_run(tmp_path / "missing")
  with pytest.raises(ValueError, match="export.json"):
    export.load_export(tmp_path)
