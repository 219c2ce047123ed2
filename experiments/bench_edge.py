r"""Latency of every ensemble prefix: in-process JAX vs onnxruntime (float32, int8), one run.

  PYTHONPATH=. python experiments/bench_edge.py --workdir=runs/default
  PYTHONPATH=. python experiments/bench_edge.py --workdir=/tmp/smoke --random_ladder=mnist

For each prefix 1..k of the run's accepted students (loaded with
``mamba_pkd.runs.load_run``, as the StableHLO export does) it prints the
per-image latency at batch 1 and batch ``--big_batch`` of

* ``jax[<method>]``: ``jax.jit`` of the summed members in this process with the
  scan method ``export.py`` lowers with (``parallel``) and, if different, the
  run's own ``model.scan_method`` (the ``InProcessEnsemble`` path of predict);
* ``ort-f32[<form>,t<n>]``: :class:`mamba_pkd.edge.runtime.OnnxEnsemble` on the
  members lowered by :func:`mamba_pkd.edge.onnx_lower.member_to_onnx` with scan
  form ``<form>``, ``n`` intra-op threads;
* ``ort-int8``: the same after ``onnx_lower.quantize_int8``,

timed side by side: ``--rounds`` rounds, each timing every variant in turn
(mean of ``--calls`` calls after warm-up); printed per image: the minimum over
rounds of the wall time and of the process CPU time (all threads), with
``os.getloadavg()`` at that row. It also prints model sizes on disk, the
largest |ONNX - JAX| logit difference of each prefix, and test accuracy of
JAX, ONNX float32 and ONNX int8 on the run's test set.

``--random_ladder=mnist`` adds a table for randomly initialised members of a
ladder family (28x28x1 images, the default run's shapes, ``--bidirectional``)
so the numbers of a full-size run can be previewed without one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mamba_pkd import data as data_lib
from mamba_pkd import flops, ladders, models, runs
from mamba_pkd.ensemble import Member
from mamba_pkd.preprocessing import Preprocessing
from mamba_pkd.edge import onnx_lower, runtime


def _load():
  return "%.2f %.2f %.2f" % os.getloadavg()


def _time_round(fn, calls: int) -> tuple[float, float]:
  """(wall, CPU) seconds per call, CPU = this process's time over all its threads."""
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(calls):
    fn()
  return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def time_side_by_side(variants: dict, *, rounds: int, calls: int) -> dict[str, tuple[float, float]]:
  """Per variant (min wall, min CPU) seconds per call over interleaved rounds.

  The minimum over rounds, not the median: on a shared machine a round is
  slowed by other processes, never sped up.
  """
  for fn in variants.values():  # warm-up (compiles, allocates)
    fn()
    fn()
  samples = {name: [] for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      samples[name].append(_time_round(fn, calls))
  return {name: (min(w for w, _ in s), min(c for _, c in s)) for name, s in samples.items()}


def jax_prefix_fn(members, k: int, scan_method: str):
  """A jitted x -> F_k with every member's scan method set to ``scan_method``."""
  chosen = [
      dataclasses.replace(m, config=m.config.replace(scan_method=scan_method)) for m in members[:k]
  ]
  ens = runs.InProcessEnsemble(chosen, preprocessing=None, teacher_flops=1)
  return ens.prefix_forward(k)


def lower_members(members, out_dir: pathlib.Path, scan_form: str):
  """Writes member_<j>.<form>.onnx and .int8.onnx; returns (f32 paths, int8 paths)."""
  f32, int8 = [], []
  for j, m in enumerate(members, start=1):
    proto = onnx_lower.member_to_onnx(m.config, m.params, scan_form=scan_form)
    path = onnx_lower.save(proto, out_dir / f"member_{j}.{scan_form}.onnx")
    f32.append(path)
    int8.append(onnx_lower.quantize_int8(path, out_dir / f"member_{j}.{scan_form}.int8.onnx"))
  return f32, int8


def bench_members(members, preprocessing, args, out_dir: pathlib.Path, title: str, data=None):
  """Prints size, numerics, accuracy and the latency table for ``members``."""
  print(f"\n=== {title}: {len(members)} member(s) ===", flush=True)
  meta = [
      {"name": m.name, "flops": m.flops, "connect_dim": m.config.connect_dim, "prefix_scale": 1.0}
      for m in members
  ]
  prep = preprocessing.to_json()
  ensembles, sizes = {}, {}
  for form in args.scan_forms:
    f32, int8 = lower_members(members, out_dir, form)
    sizes[f"f32[{form}]"] = [p.stat().st_size for p in f32]
    sizes[f"int8[{form}]"] = [p.stat().st_size for p in int8]
    for threads in args.threads:
      ensembles[f"ort-f32[{form},t{threads}]"] = runtime.OnnxEnsemble(
          f32, meta, prep, intra_op_threads=threads, max_batch=args.max_batch
      )
    ensembles[f"ort-int8[{form},t{args.threads[0]}]"] = runtime.OnnxEnsemble(
        int8, meta, prep, intra_op_threads=args.threads[0], max_batch=args.max_batch
    )
  for m in members:
    print(
        f"  {m.name}: {m.size} d_model={m.config.d_model} n_layers={m.config.n_layers} "
        f"d_state={m.config.d_state} tokens={m.config.num_tokens} "
        f"bidirectional={m.config.bidirectional} flops={m.flops:,} "
        f"scan form auto={onnx_lower.resolve_scan_form(m.config)}"
    )
  for name, per_member in sizes.items():
    print(f"  size on disk {name}: " + ", ".join(f"{s / 1024:.1f} KiB" for s in per_member))

  methods = ["parallel"] + (
      [members[0].config.scan_method]
      if members[0].config.scan_method not in ("parallel", "auto", "fused", "pallas")
      else []
  )
  rng = np.random.default_rng(0)
  shape = preprocessing.image_shape
  x_check = rng.standard_normal((64, *shape)).astype(np.float32)
  print("  numerics (64 random normalised images; max |ONNX - JAX| of the prefix logits):")
  for k in range(1, len(members) + 1):
    ref = np.asarray(jax_prefix_fn(members, k, "parallel")(jnp.asarray(x_check)))
    parts = []
    for name, ens in ensembles.items():
      out = ens.logits(x_check, k, normalized=True)
      parts.append(
          f"{name} {np.abs(out - ref).max():.2e} "
          f"(argmax agree {np.mean(out.argmax(-1) == ref.argmax(-1)) * 100:.1f}%)"
      )
    print(f"    prefix 1..{k}: " + "; ".join(parts))
  if data is not None:
    x_test = preprocessing.normalize(data.x_test)
    print(f"  test accuracy ({len(x_test)} images):")
    for k in range(1, len(members) + 1):
      ref = np.asarray(jax_prefix_fn(members, k, "parallel")(jnp.asarray(x_test)))
      row = [f"jax {np.mean(ref.argmax(-1) == data.y_test) * 100:.2f}%"]
      for name, ens in ensembles.items():
        out = ens.logits(x_test, k, normalized=True)
        row.append(f"{name} {np.mean(out.argmax(-1) == data.y_test) * 100:.2f}%")
      print(f"    prefix 1..{k}: " + ", ".join(row))

  print(
      f"  latency per image: min over {args.rounds} interleaved rounds of the mean of a "
      f"round's calls, wall (and CPU time of this process); Nx = jax[{methods[0]}] wall / wall:"
  )
  for batch in (1, args.big_batch):
    x_np = rng.standard_normal((batch, *shape)).astype(np.float32)
    x_jax = jnp.asarray(x_np)
    calls = args.calls if batch == 1 else max(2, args.calls // 50)
    for k in range(1, len(members) + 1):
      variants = {}
      for method in methods:
        fn = jax_prefix_fn(members, k, method)
        variants[f"jax[{method}]"] = lambda fn=fn: fn(x_jax).block_until_ready()
      for name, ens in ensembles.items():
        variants[name] = lambda ens=ens: ens.logits(x_np, k, normalized=True)
      times = time_side_by_side(variants, rounds=args.rounds, calls=calls)
      base = times[f"jax[{methods[0]}]"][0]
      cells = ", ".join(
          f"{name} {wall / batch * 1e3:.4f} ms (cpu {cpu / batch * 1e3:.4f}; {base / wall:.2f}x)"
          for name, (wall, cpu) in times.items()
      )
      print(f"    batch {batch:>3} prefix 1..{k}: {cells}  [load {_load()}]", flush=True)


def random_members(family: str, bidirectional: bool, sizes: list[str]):
  configs = ladders.ladder_configs(
      family, image_shape=(28, 28, 1), num_classes=10, bidirectional=bidirectional
  )
  members = []
  for j, size in enumerate(sizes, start=1):
    cfg = configs[size]
    params = jax.device_get(models.init_params(cfg, jax.random.key(j)))
    members.append(
        Member(
            name=f"random_{size}",
            stage="-",
            size=size,
            flops=flops.count_flops(cfg),
            num_params=flops.count_params(cfg),
            d_model=cfg.d_model,
            connect_dim=cfg.connect_dim,
            config=cfg,
            params=params,
        )
    )
  return members


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished mamba_pkd.main run")
  parser.add_argument("--scan_forms", default="auto", help="comma list of auto,dual,recurrent")
  parser.add_argument("--threads", default="1", help="comma list of ORT intra-op thread counts")
  parser.add_argument("--big_batch", type=int, default=256)
  parser.add_argument(
      "--max_batch",
      type=int,
      default=64,
      help="OnnxEnsemble max_batch (the forced dual form of a wide member at batch 256 "
      "was killed for memory at 20 GB)",
  )
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=200, help="calls per round at batch 1")
  parser.add_argument("--teacher", action="store_true", help="also time the teacher alone")
  parser.add_argument("--random_ladder", default="", help="e.g. mnist: random-init ladder preview")
  parser.add_argument("--random_sizes", default="s1,s2,s3,s4")
  parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--no_accuracy", action="store_true", help="skip the test-set accuracy")
  args = parser.parse_args(argv)
  args.scan_forms = args.scan_forms.split(",")
  args.threads = [int(t) for t in args.threads.split(",")]
  print(
      f"jax {jax.__version__} ({jax.default_backend()}), onnxruntime "
      f"{runtime.ort.__version__}, {os.cpu_count()} CPUs, load {_load()}",
      flush=True,
  )
  out_dir = pathlib.Path(tempfile.mkdtemp(prefix="bench_edge_"))
  run = runs.load_run(args.workdir, with_teacher=args.teacher)
  data = None
  if not args.no_accuracy:
    import json  # pylint: disable=g-import-not-at-top

    config = json.loads((run.workdir / "config.json").read_text())
    data = data_lib.load_dataset(config["dataset"], seed=int(config.get("seed", 0)))
  students = runs.select_members(run)
  bench_members(students, run.preprocessing, args, out_dir, f"{run.workdir} students", data)
  if args.teacher:
    bench_members([run.teacher], run.preprocessing, args, out_dir / "t", "teacher", data)
  if args.random_ladder:
    members = random_members(args.random_ladder, args.bidirectional, args.random_sizes.split(","))
    prep = Preprocessing((28, 28, 1), 10, (0.5,), (0.25,))
    bench_members(
        members,
        prep,
        args,
        out_dir / "random",
        f"random-init {args.random_ladder} ladder {args.random_sizes} "
        f"(bidirectional={args.bidirectional})",
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
