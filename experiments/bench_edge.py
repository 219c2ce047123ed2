r"""Every ensemble prefix in-process JAX vs onnxruntime (float32, int8), side by side in one run.

  PYTHONPATH=. python experiments/bench_edge.py --workdir=runs/default --markdown=/tmp/edge.md
  PYTHONPATH=. python experiments/bench_edge.py --workdir=runs/default --scan_forms=auto,dual \
      --max_batch=64    # the dual form's [b, 2, E, N, L(L+1)/2] temporaries: GBs at b = 256

The run's students are exported with ``python -m mamba_pkd.export --format=onnx
--int8`` (:func:`mamba_pkd.export.export_run`) into a temporary directory per
``--scan_forms`` entry and loaded with :class:`mamba_pkd.edge.runtime.OnnxEnsemble`.
For each prefix 1..k it prints, at batch 1 and ``--big_batch``, the per-image
latency of

* ``jax[<method>]``: the in-process ensemble's jitted prefix
  (``runs.InProcessEnsemble.prefix_forward(k)``, compiled once, the same
  function ``predict --model=<workdir>`` runs) with the run's own scan method
  and with ``parallel`` (what the StableHLO export lowers);
* ``ort-f32[<form>]`` / ``ort-int8[<form>]``: one call of ``prefix_<k>.onnx``
  (``OnnxEnsemble.prefix_forward(k)``: the whole prefix in one graph, one
  intra-op thread) on a NumPy array;

timed side by side: ``--rounds`` interleaved rounds, each timing every variant
in turn (mean of ``--calls`` calls after warm-up); the minimum over rounds
(other processes only ever slow a round down), with ``os.getloadavg()`` on
every row. It also prints the size on disk of each prefix file, the largest
|ONNX - JAX| of each prefix's logits on the run's test images, the test
accuracy of JAX, ONNX float32 and int8, and whether the ONNX cascade of every
stored budget makes the same exit decisions as the JAX one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from mamba_pkd import cascade, export, runs
from mamba_pkd import data as data_lib
from mamba_pkd.edge import runtime


def _load() -> str:
  return "%.2f %.2f %.2f" % os.getloadavg()


def time_side_by_side(variants: dict, *, rounds: int, calls: int) -> dict[str, float]:
  """Per variant, the minimum over interleaved rounds of the mean seconds per call."""
  for fn in variants.values():  # warm-up (compiles, allocates)
    fn()
    fn()
  best = {name: float("inf") for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      start = time.perf_counter()
      for _ in range(calls):
        fn()
      best[name] = min(best[name], (time.perf_counter() - start) / calls)
  return best


def jax_ensembles(run, methods):
  """``{name: InProcessEnsemble}`` of all students with each scan method."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  out = {}
  for method in methods:
    members = [
        dataclasses.replace(m, config=m.config.replace(scan_method=method))
        for m in runs.select_members(run)
    ]
    ens = runs.ensemble_from_run(run, members)
    ens.teacher_fn = None
    out[f"jax[{method}]"] = ens
  return out


def onnx_ensembles(workdir, forms, out_root: pathlib.Path):
  """``{name: OnnxEnsemble}`` (float32 and int8) and file sizes, per scan form."""
  ensembles, sizes = {}, {}
  for form in forms:
    out = out_root / form
    export.export_run(workdir, out, artifact="onnx", onnx_options={"scan_form": form, "int8": True})
    for int8 in (False, True):
      name = f"ort-{'int8' if int8 else 'f32'}[{form}]"
      ensembles[name] = runtime.load_onnx_export(out, int8=int8)
      files = ensembles[name].meta["onnx"]["prefix_files"]
      suffix = ".int8.onnx" if int8 else ".onnx"
      sizes[name] = [(out / f.replace(".onnx", suffix)).stat().st_size for f in files]
  return ensembles, sizes


def check_numerics(jax_ens, ensembles, x, labels, lines):
  """Max |ONNX - JAX|, argmax agreement and accuracy per prefix; cascade decisions per budget."""
  n = jax_ens.num_members
  for k in range(1, n + 1):
    ref = jax_ens.logits(x, num_members=k, normalized=True)
    cells = [f"jax acc {np.mean(ref.argmax(-1) == labels) * 100:.2f}%"]
    for name, ens in ensembles.items():
      out = ens.logits(x, num_members=k, normalized=True)
      cells.append(
          f"{name} max|d| {np.abs(out - ref).max():.2e}, argmax same "
          f"{np.mean(out.argmax(-1) == ref.argmax(-1)) * 100:.1f}%, acc "
          f"{np.mean(out.argmax(-1) == labels) * 100:.2f}%"
      )
    lines.append(f"  prefix 1..{k}: " + "; ".join(cells))
  if jax_ens.combination is None:
    return
  for label, rule in jax_ens.combination.cascades.items():
    if rule is None:
      continue
    ref = cascade.cascade_predict(jax_ens, x, jax_ens.combination, rule)
    cells = [f"jax acc {np.mean(ref.classes == labels) * 100:.2f}%"]
    for name, ens in ensembles.items():
      got = cascade.cascade_predict(ens, x, jax_ens.combination, rule)
      cells.append(
          f"{name} exits identical {bool(np.array_equal(got.members_used, ref.members_used))}, "
          f"acc {np.mean(got.classes == labels) * 100:.2f}%"
      )
    lines.append(f"  cascade@{label}: " + "; ".join(cells))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished mamba_pkd.main run")
  parser.add_argument("--scan_forms", default="auto", help="comma list of ONNX scan forms")
  parser.add_argument("--big_batch", type=int, default=256)
  parser.add_argument(
      "--max_batch",
      type=int,
      default=256,
      help="onnxruntime calls take at most this many images (the forced dual form of the "
      "default run's prefix 1..5 at batch 256 was OOM-killed at 21 GB RSS: use 64 with dual)",
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=200, help="calls per round at batch 1")
  parser.add_argument("--markdown", default="", help="also write the latency table here")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  print(
      f"jax {jax.__version__} ({jax.default_backend()}), onnxruntime "
      f"{runtime.ort.__version__}, {os.cpu_count()} CPUs, load {_load()}",
      flush=True,
  )
  run = runs.load_run(args.workdir, with_teacher=False)
  run_method = run.students[0].config.scan_method
  methods = [run_method] + (["parallel"] if run_method != "parallel" else [])
  jaxes = jax_ensembles(run, methods)
  forms = args.scan_forms.split(",")
  onnxes, sizes = onnx_ensembles(args.workdir, forms, pathlib.Path(tempfile.mkdtemp()))
  config = json.loads((pathlib.Path(args.workdir) / "config.json").read_text())
  data = data_lib.load_dataset(config["dataset"], seed=int(config.get("seed", 0)))
  x_test = run.preprocessing.normalize(data.x_test)
  lines = [f"numerics on {len(x_test)} test images (vs {methods[0]}):"]
  check_numerics(jaxes[f"jax[{methods[0]}]"], onnxes, x_test, data.y_test, lines)
  print("\n".join(lines), flush=True)
  n = jaxes[f"jax[{methods[0]}]"].num_members
  names = list(jaxes) + list(onnxes)
  header = ["batch", "prefix"] + [f"{v} ms/image" for v in names] + ["ort-f32 speed-up", "load"]
  rows = []
  rng = np.random.default_rng(0)
  for batch in (1, args.big_batch):
    x_np = rng.standard_normal((batch, *run.preprocessing.image_shape)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    calls = args.calls if batch == 1 else max(3, args.calls // 40)
    for k in range(1, n + 1):
      variants = {}
      for name, ens in jaxes.items():
        fn = ens.prefix_forward(k)
        variants[name] = lambda fn=fn: fn(x_jax).block_until_ready()
      for name, ens in onnxes.items():
        fn, mb = ens.prefix_forward(k), args.max_batch
        variants[name] = lambda fn=fn, mb=mb: [fn(x_np[i : i + mb]) for i in range(0, batch, mb)]
      times = time_side_by_side(variants, rounds=args.rounds, calls=calls)
      base = min(times[name] for name in jaxes)
      f32 = min(times[f"ort-f32[{form}]"] for form in forms)
      cells = [f"{times[v] / batch * 1e3:.4f}" for v in names]
      rows.append([str(batch), f"1..{k}", *cells, f"{base / f32:.2f}x", _load()])
      print("  ".join(f"{h}={c}" for h, c in zip(header, rows[-1])), flush=True)
  size_row = ["size on disk (KiB, prefix_k)", ""]
  for name, per_prefix in sizes.items():
    size_row.append(f"{name}: " + ", ".join(f"{s / 1024:.0f}" for s in per_prefix))
  print("  ".join(size_row))
  if args.markdown:
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(table) + "\n\n" + "\n".join(lines) + "\n\n" + "; ".join(size_row[2:]) + "\n"
    pathlib.Path(args.markdown).write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
