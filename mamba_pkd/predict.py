r"""Classify images with an exported ensemble or a run's workdir, under a budget.

  python -m mamba_pkd.predict --model=runs/default/export digit.png other.png
  python -m mamba_pkd.predict --model=runs/default --max_flops_pct=25 --confidence=0.9 \
      images.npz

``--model`` is a bundle written by ``python -m mamba_pkd.export`` (a directory
with ``export.json``) or a finished run's ``--workdir`` (its accepted students
run in-process). Images are PNG (or any format Pillow reads) files, converted
to the model's channels (grayscale or RGB) and resized only when their size
differs (a message says so), or ``.npz`` files with key ``x`` or ``images``
([N, H, W, C] or [N, H, W] for one channel; uint8 pixels or float pixels in [0, 1]).

Budget, anytime inference:

* ``--max_flops`` (FLOPs per image; ``25%`` = percent of the teacher),
  ``--max_flops_pct`` and ``--max_latency_ms`` (one forward of a batch of
  ``--latency_batch`` images, measured on this machine) pick the LARGEST
  ensemble prefix ``student_1..k`` that fits all the given budgets.
* ``--confidence=c`` stops early per image: after member j the prefix's
  softmax margin (top-1 minus top-2 probability of ``F_j``) is compared with
  ``c``; an image at or above it is not passed to member j+1. Each image's
  member count is printed.
* ``--budget=2%`` (or FLOPs per image, ``--budget=60k``) runs the run's own
  early-exit cascade: the rule the run chose on held-out data for the largest
  stored budget within it (``report.cascade_budgets_pct``: per-prefix
  weights and temperatures, one threshold on the calibrated top-1
  probability, maybe the teacher as last exit). It needs a run's workdir or
  a bundle of all its students, and excludes the other budget flags.

The pure pieces (:func:`softmax_margin`, :func:`anytime_predict`, from
:mod:`mamba_pkd.ensemble`,
:func:`choose_prefix`, the readers) are importable for programmatic use.
"""

from __future__ import annotations

import argparse
import logging
import dataclasses
import json
import pathlib
import sys
from typing import Callable, Sequence

import numpy as np

from mamba_pkd import ensemble as ensemble_lib
from mamba_pkd import export as export_lib
from mamba_pkd import cascade, manifest, metrics
from mamba_pkd.ensemble import AnytimeResult, BudgetError, Ensemble, anytime_predict, softmax_margin
from mamba_pkd.preprocessing import Preprocessing

NPZ_KEYS = ("x", "images")
RUNTIMES = ("auto", "jax", "onnx")
LATENCY_REPEATS = 10


# ----------------------------------------------------------------------------
# Reading images.
# ----------------------------------------------------------------------------


def read_image_file(
    path: str | pathlib.Path, image_shape: tuple[int, int, int], *, notes: list[str] | None = None
) -> np.ndarray:
  """One image file as uint8 [H, W, C] of the model's shape.

  Grayscale/RGB/palette/alpha images are converted to the model's channel count
  (1: luminance, 3: RGB); 16-bit grayscale is scaled to 8 bits. An image of
  another size is resized (bilinear) and a note is appended to ``notes``.

  Raises:
    ValueError: unreadable file (the message names it) or a channel count
      other than 1 or 3.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  h, w, c = image_shape
  if c not in (1, 3):
    raise ValueError(
        f"the model takes {c}-channel images; only 1 (grayscale) and 3 (RGB) "
        "can be read from image files: pass an .npz instead"
    )
  path = pathlib.Path(path)
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, np.float64)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
      img = img.convert("L" if c == 1 else "RGB")
      if img.size != (w, h):
        if notes is not None:
          notes.append(
              f"{path}: resized from {img.size[0]}x{img.size[1]} to {w}x{h} "
              "(the model's input size)"
          )
        img = img.resize((w, h), Image.Resampling.BILINEAR)
      arr = np.asarray(img, np.uint8)
  except FileNotFoundError:
    raise ValueError(f"image file {str(path)!r} does not exist") from None
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(
        f"cannot read image {str(path)!r} ({type(e).__name__}: {e}); give PNG "
        f"files or an .npz with key 'x' or 'images'"
    ) from None
  return arr.reshape(h, w, c)


def read_npz(path: str | pathlib.Path, image_shape: tuple[int, int, int]) -> np.ndarray:
  """The images of an .npz: key ``x`` or ``images``, [N, H, W, C] (or [N, H, W] if C == 1).

  Returns:
    The array (uint8 pixels or float pixels in [0, 1]; not normalised here).

  Raises:
    ValueError: unreadable file, missing key (the keys present are listed),
      wrong shape (the expected one is named).
  """
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      key = next((k for k in NPZ_KEYS if k in data.files), None)
      if key is None:
        raise ValueError(
            f"{path} has no array named {' or '.join(map(repr, NPZ_KEYS))} "
            f"(it has {data.files})"
        )
      images = data[key]
  except FileNotFoundError:
    raise ValueError(f"npz file {str(path)!r} does not exist") from None
  except (OSError, EOFError) as e:
    raise ValueError(f"cannot read {str(path)!r} as .npz ({type(e).__name__}: {e})") from None
  h, w, c = image_shape
  if images.ndim == 3 and c == 1:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (h, w, c):
    raise ValueError(
        f"{path}[{key!r}] has shape {images.shape}; the model takes "
        f"[N, {h}, {w}, {c}]" + (f" (or [N, {h}, {w}])" if c == 1 else "")
    )
  return images


def read_inputs(
    paths: Sequence[str | pathlib.Path],
    preprocessing: Preprocessing,
    *,
    invert: bool = False,
    notes: list[str] | None = None,
) -> tuple[list[str], np.ndarray]:
  """Image files and .npz files -> (names, model inputs float32 [N, H, W, C]).

  Every file is read and checked before anything is classified. ``invert``
  flips pixel values (``255 - x``), e.g. for dark digits on a light page
  when the model was trained on MNIST's light digits on black.

  Raises:
    ValueError: no paths, or any unreadable or wrongly shaped input.
  """
  if not paths:
    raise ValueError("no images given: pass PNG files or an .npz (key 'x' or 'images')")
  names, batches = [], []
  for path in paths:
    path = pathlib.Path(path)
    if path.suffix.lower() == ".npz":
      images = read_npz(path, preprocessing.image_shape)
      if invert:  # uint8: 255 - x; float pixels in [0, 1]: 1 - x
        images = (255 - images) if images.dtype == np.uint8 else (1.0 - images)
      batches.append(preprocessing.normalize(images))
      names.extend(f"{path}[{i}]" for i in range(len(images)))
    else:
      image = read_image_file(path, preprocessing.image_shape, notes=notes)[None]
      batches.append(preprocessing.normalize(255 - image if invert else image))
      names.append(str(path))
  return names, np.concatenate(batches).astype(np.float32)


# ----------------------------------------------------------------------------
# Budgets.
# ----------------------------------------------------------------------------


def measure_latency_ms(
    ensemble: Ensemble, k: int, *, batch: int = 1, repeats: int = LATENCY_REPEATS
) -> float:
  """Median ms of one forward of prefix 1..k on a batch of ``batch`` images, here."""
  if hasattr(ensemble, "measure_latency_ms"):  # the ONNX runtime times itself, without jax
    return ensemble.measure_latency_ms(k, batch=batch, repeats=repeats)
  from mamba_pkd import report  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jnp.zeros((batch, *ensemble.preprocessing.image_shape), jnp.float32)
  return report.compute_latency_ms(ensemble.prefix_forward(k), x, repeats=repeats, warmup=2)


@dataclasses.dataclass
class Choice:
  """The prefix picked under a budget and why."""

  k: int
  cost: ensemble_lib.PrefixCost
  latencies_ms: dict[int, float]
  reason: str


def choose_prefix(
    ensemble: Ensemble,
    *,
    max_flops: float | None = None,
    max_flops_pct: float | None = None,
    max_latency_ms: float | None = None,
    latency_batch: int = 1,
    latency_ms: Callable[[int], float] | None = None,
) -> Choice:
  """The largest prefix of ``ensemble`` within every given budget (all None: all members).

  ``latency_ms(k)`` defaults to :func:`measure_latency_ms` on this machine.

  Raises:
    BudgetError: nothing fits (names the cheapest prefix's cost).
  """
  costs = ensemble.costs()
  if latency_ms is None:
    latency_ms = lambda k: measure_latency_ms(ensemble, k, batch=latency_batch)  # noqa: E731
  k, measured = ensemble_lib.largest_prefix_within(
      costs,
      max_flops=max_flops,
      max_flops_pct=max_flops_pct,
      max_latency_ms=max_latency_ms,
      latency_ms=latency_ms if max_latency_ms is not None else None,
  )
  budgets = [
      s
      for s in (
          f"--max_flops={max_flops:,.0f}" if max_flops is not None else "",
          f"--max_flops_pct={max_flops_pct:g}" if max_flops_pct is not None else "",
          f"--max_latency_ms={max_latency_ms:g} (batch {latency_batch})"
          if max_latency_ms is not None
          else "",
      )
      if s
  ]
  if budgets:
    reason = f"largest prefix within {' and '.join(budgets)}"
    if k < len(costs):
      nxt = costs[k]
      reason += (
          f"; the next, prefix 1..{nxt.k}, needs {nxt.pct_teacher_flops:.2f}% of the "
          f"teacher's FLOPs" + (f" and {measured[nxt.k]:.3g} ms" if nxt.k in measured else "")
      )
  else:
    reason = "no budget given: all members"
  return Choice(k=k, cost=costs[k - 1], latencies_ms=measured, reason=reason)


# ----------------------------------------------------------------------------
# Loading a model.
# ----------------------------------------------------------------------------


def load_model(
    path: str | pathlib.Path,
    *,
    batch_size: int = export_lib.DEFAULT_BATCH_SIZE,
    with_teacher: bool = False,
    runtime: str = "auto",
    int8: bool = False,
) -> Ensemble:
  """An export bundle (``export.json`` inside) or a finished run's workdir.

  ``runtime``: ``"jax"`` (StableHLO bundles, workdirs), ``"onnx"`` (bundles of
  ``export --format=onnx``, run by onnxruntime and numpy alone, ``int8``: their
  int8 files) or ``"auto"`` (what the bundle holds).

  Raises:
    ValueError: neither, or a bundle of the other runtime (the message says what was expected).
  """
  if runtime not in RUNTIMES:
    raise ValueError(f"--runtime={runtime!r} must be one of {RUNTIMES}")
  path = pathlib.Path(path)
  if (path / export_lib.SIDECAR).is_file() or path.name == export_lib.SIDECAR:
    directory = path.parent if path.name == export_lib.SIDECAR else path
    artifact = export_lib.read_sidecar(directory).get("artifact", "stablehlo")
    if runtime == "onnx" or (runtime == "auto" and artifact == "onnx"):
      export_lib.read_sidecar(directory, "onnx")  # a StableHLO bundle: says to re-export
      try:
        from mamba_pkd.edge import runtime as onnx_runtime  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError(f"--runtime=onnx needs the edge extra (pip install -e '.[edge]'): {e}")
      return onnx_runtime.load_onnx_export(directory, int8=int8, batch_size=batch_size)
    export_lib.read_sidecar(directory, "stablehlo")  # an ONNX bundle with --runtime=jax
  if int8:
    raise ValueError("--int8 runs the int8 files of an ONNX export (export --format=onnx --int8)")
  if (path / export_lib.SIDECAR).is_file() or path.name == export_lib.SIDECAR:
    return export_lib.load_export(path, batch_size=batch_size)
  if (path / manifest.FILENAME).is_file() or (path / "config.json").is_file():
    if runtime == "onnx":
      raise ValueError(
          f"--runtime=onnx runs an ONNX export, not a workdir: write one with `python -m "
          f"mamba_pkd.export --workdir={path} --out={path / 'export_onnx'} --format=onnx`"
      )
    from mamba_pkd import runs  # pylint: disable=g-import-not-at-top  (Flax: in-process only)

    run = runs.load_run(path, with_teacher=with_teacher)
    return runs.ensemble_from_run(run, batch_size=batch_size)
  raise ValueError(
      f"--model={str(path)!r} is neither an export bundle (a directory with "
      f"{export_lib.SIDECAR}, from `python -m mamba_pkd.export`) nor a finished "
      "run's workdir (with results.json)"
  )


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m mamba_pkd.predict",
      description="Classify images with an exported PKD ensemble (or a run's workdir) under "
      "a FLOPs or latency budget, with optional per-image early exit.",
  )
  parser.add_argument("images", nargs="*", help="PNG/JPEG files and/or .npz (key x or images)")
  parser.add_argument("--model", required=True, help="export bundle or a finished run's workdir")
  parser.add_argument("--max_flops", help="FLOPs per image (2e6, 150k, 3M) or teacher %% (25%%)")
  parser.add_argument("--max_flops_pct", type=float, help="percent of the teacher's FLOPs")
  parser.add_argument(
      "--max_latency_ms", type=float, help="ms per forward of --latency_batch images, measured here"
  )
  parser.add_argument("--latency_batch", type=int, default=1, help="batch of --max_latency_ms")
  parser.add_argument(
      "--confidence",
      type=float,
      help="early exit: stop for an image once its softmax margin "
      "(top1 - top2) reaches this value, in (0, 1]",
  )
  parser.add_argument(
      "--budget",
      help="early-exit cascade of the run under this mean budget: a percentage of the "
      "teacher's FLOPs (2%%) or FLOPs per image (60k); uses the thresholds the run stored",
  )
  parser.add_argument("--invert", action="store_true", help="255 - x: dark digits on white")
  parser.add_argument(
      "--batch_size",
      type=int,
      default=export_lib.DEFAULT_BATCH_SIZE,
      help="largest batch of one compiled call",
  )
  parser.add_argument(
      "--runtime",
      default="auto",
      choices=RUNTIMES,
      help="jax (StableHLO bundle or workdir) or onnx (a bundle of export --format=onnx, "
      "onnxruntime and numpy only); auto: what --model holds",
  )
  parser.add_argument("--int8", action="store_true", help="onnx: run the bundle's int8 files")
  parser.add_argument("--output_json", help="also write the predictions to this JSON file")
  return parser


def _validate_args(args) -> tuple[float | None, float | None]:
  """Checks every flag before anything is loaded; returns (max_flops, max_flops_pct)."""
  max_flops, max_flops_pct = None, args.max_flops_pct
  if args.max_flops is not None:
    max_flops, pct = ensemble_lib.parse_flops(args.max_flops)
    if pct is not None:
      if max_flops_pct is not None:
        raise ValueError("give the percentage once: --max_flops=25% or --max_flops_pct=25")
      max_flops_pct = pct
  if max_flops_pct is not None and not max_flops_pct > 0:
    raise ValueError(f"--max_flops_pct={max_flops_pct} must be > 0 (percent of the teacher)")
  if args.max_latency_ms is not None and not args.max_latency_ms > 0:
    raise ValueError(f"--max_latency_ms={args.max_latency_ms} must be > 0")
  if args.latency_batch < 1:
    raise ValueError(f"--latency_batch={args.latency_batch} must be >= 1")
  if args.confidence is not None and not 0 < args.confidence <= 1:
    raise ValueError(
        f"--confidence={args.confidence} must be in (0, 1] (a softmax margin: "
        "top-1 minus top-2 probability)"
    )
  if args.batch_size < 1:
    raise ValueError(f"--batch_size={args.batch_size} must be >= 1")
  if args.budget is not None:
    ensemble_lib.parse_flops(args.budget)
    others = [
        f"--{n}"
        for n in ("max_flops", "max_flops_pct", "max_latency_ms", "confidence")
        if getattr(args, n) is not None
    ]
    if others:
      raise ValueError(
          f"--budget runs the run's stored cascade; do not combine it with {', '.join(others)}"
      )
  if not args.images:
    raise ValueError(
        "no images given: pass PNG files or an .npz (key 'x' or 'images') " "after the flags"
    )
  return max_flops, max_flops_pct


def choose_rule(ensemble: Ensemble, budget: str) -> dict:
  """The stored cascade rule for ``budget`` (``"2%"`` or FLOPs per image; raises BudgetError)."""
  return cascade.rule_for_budget_text(ensemble.combination, budget, ensemble.teacher_flops)


def run_cascade(args, ensemble: Ensemble, names: list[str], x: np.ndarray) -> dict:
  """``--budget``: the stored cascade on ``x``; prints and returns the predictions."""
  rule = choose_rule(ensemble, args.budget)
  result = cascade.cascade_predict(
      ensemble, x, ensemble.combination, rule, teacher=ensemble.teacher_fn
  )
  n = ensemble.num_members
  print(f"model: {ensemble.description}; {n} member(s), teacher {ensemble.teacher_flops:,} FLOPs")
  print(f"using {cascade.describe(rule)}")
  width = max(len("image"), *(len(name) for name in names))
  print(f"{'image':<{width}}  class  confidence  exit")
  stage = lambda u: "teacher" if u > n else f"{u}"  # noqa: E731
  for name, cls, conf, used in zip(names, result.classes, result.margins, result.members_used):
    print(f"{name:<{width}}  {int(cls):>5}  {float(conf):10.3f}  {stage(int(used)):>4}")
  counts = np.bincount(result.members_used, minlength=n + 2)[1:]
  print(
      "exits: "
      + ", ".join(f"{stage(j)}: {c}" for j, c in enumerate(counts, start=1) if j <= n or c)
      + f"; mean {result.mean_flops:,.0f} FLOPs/image = "
      f"{100 * result.mean_flops / ensemble.teacher_flops:.2f}% of the teacher"
  )
  return {
      "model": str(args.model),
      "budget": args.budget,
      "rule": rule,
      "mean_flops": result.mean_flops,
      "pct_teacher_flops": 100 * result.mean_flops / ensemble.teacher_flops,
      "predictions": [
          {"image": nm, "class": int(c), "confidence": float(p), "exit": stage(int(u))}
          for nm, c, p, u in zip(names, result.classes, result.margins, result.members_used)
      ],
  }


def run(args) -> dict:
  """Everything :func:`main` does, returning the printed results as a dict."""
  max_flops, max_flops_pct = _validate_args(args)
  if args.budget is not None:
    ensemble = load_model(
        args.model,
        batch_size=args.batch_size,
        with_teacher=True,
        runtime=args.runtime,
        int8=args.int8,
    )
    rule = choose_rule(ensemble, args.budget)  # before any file is read
    if rule["teacher_exit"] and ensemble.teacher_fn is None:
      raise BudgetError(f"{cascade.describe(rule)}, but {ensemble.description} has no teacher")
    notes: list[str] = []
    names, x = read_inputs(args.images, ensemble.preprocessing, invert=args.invert, notes=notes)
    print("".join(f"note: {note}\n" for note in notes), end="", file=sys.stderr, flush=True)
    out = run_cascade(args, ensemble, names, x)
    if args.output_json:
      pathlib.Path(args.output_json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out
  ensemble = load_model(
      args.model, batch_size=args.batch_size, runtime=args.runtime, int8=args.int8
  )
  # The static FLOPs budget first: a budget nothing meets fails before any file is read.
  ensemble_lib.largest_prefix_within(
      ensemble.costs(), max_flops=max_flops, max_flops_pct=max_flops_pct
  )
  notes: list[str] = []
  names, x = read_inputs(args.images, ensemble.preprocessing, invert=args.invert, notes=notes)
  for note in notes:
    print(f"note: {note}", file=sys.stderr, flush=True)
  choice = choose_prefix(
      ensemble,
      max_flops=max_flops,
      max_flops_pct=max_flops_pct,
      max_latency_ms=args.max_latency_ms,
      latency_batch=args.latency_batch,
  )
  result = anytime_predict(ensemble, x, num_members=choice.k, confidence=args.confidence)
  sizes = [m.size for m in ensemble.members]
  acc = ensemble.prefix_accuracy[choice.k - 1] if ensemble.prefix_accuracy else None
  print(
      f"model: {ensemble.description}; {ensemble.num_members} member(s) "
      f"({'+'.join(sizes)}); teacher {ensemble.teacher_flops:,} FLOPs/image"
  )
  print(
      f"using {choice.cost.describe()}"
      + (f"; test accuracy in the run {100 * acc:.2f}%" if acc is not None else "")
  )
  print(f"  ({choice.reason})")
  for k, ms in sorted(choice.latencies_ms.items()):
    print(f"  measured latency, prefix 1..{k}: {ms:.3g} ms per batch of {args.latency_batch}")
  if args.confidence is not None:
    print(f"early exit at softmax margin >= {args.confidence:g}")
  width = max(len("image"), *(len(n) for n in names))
  print(f"{'image':<{width}}  class  margin  members")
  for name, cls, margin, used in zip(names, result.classes, result.margins, result.members_used):
    print(f"{name:<{width}}  {int(cls):>5}  {float(margin):6.3f}  {int(used):>7}")
  counts = np.bincount(result.members_used, minlength=choice.k + 1)[1:]
  print(
      f"members used per image: mean {result.members_used.mean():.2f} of {choice.k} ("
      + ", ".join(f"{j}: {c}" for j, c in enumerate(counts, start=1))
      + "); "
      f"mean {result.mean_flops:,.0f} FLOPs/image = "
      f"{100 * result.mean_flops / ensemble.teacher_flops:.2f}% of the teacher"
  )
  out = {
      "model": str(args.model),
      "prefix": choice.k,
      "prefix_flops": choice.cost.flops,
      "pct_teacher_flops": choice.cost.pct_teacher_flops,
      "reason": choice.reason,
      "latencies_ms": {str(k): v for k, v in choice.latencies_ms.items()},
      "confidence": args.confidence,
      "mean_flops": result.mean_flops,
      "predictions": [
          {"image": n, "class": int(c), "margin": float(m), "members": int(u)}
          for n, c, m, u in zip(names, result.classes, result.margins, result.members_used)
      ],
  }
  if args.output_json:
    pathlib.Path(args.output_json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  metrics.quiet_library_logs(logging.ERROR)
  try:
    run(args)
  except (ValueError, BudgetError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
