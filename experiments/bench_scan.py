r"""Side-by-side timing of the selective-scan methods (and, optionally, mambapy).

For each (batch, L, d_inner, N) it times, in one process, in rounds over all
methods (so that drifts in the load of a shared machine hit every method alike;
each method runs a few calls back to back per round, after one untimed call):
  * forward: ``jit(selective_scan)``;
  * forward+backward: ``jit(grad(sum(w * selective_scan(...))))`` w.r.t. all
    seven inputs (u, delta, A, B, C, D, delta_bias);
and prints the median milliseconds and the speed-ups over ``parallel`` (the
materialising associative scan) and ``sequential`` (``lax.scan``):
``x par = t(parallel) / t(method)``. It also prints each method's relative
error ``max|y - y_seq| / max|y_seq|`` against ``sequential`` as a sanity check.

Usage (from the repository root):

    python experiments/bench_scan.py                       # about 2-3 min on 2 CPU cores
    python experiments/bench_scan.py --rounds 5 --shapes 64,196,128,16
    python experiments/bench_scan.py --pallas_interpret    # + pallas via its interpreter (slow)

On a GPU, ``pallas`` (the compiled kernel) is timed as well.

``--torch`` also times mambapy's selective scan (``MambaBlock.selective_scan``,
the Blelloch ``pscan``; ``--torch_seq`` adds ``MambaBlock.selective_scan_seq``,
its Python loop, which takes minutes at L = 784) on the same data, with ``torch.set_num_threads`` equal to the CPU count that
JAX uses, and prints ours/theirs ratios. It needs the benchmark extras, never
a project dependency (an unpinned torch pulls a multi-GB CUDA build):

    pip install torch==2.13.0 mambapy==1.2.0

and glibc malloc tuned so that torch's large temporaries are not page-faulted
in on every call (without it torch's times are inflated):

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
    MALLOC_TOP_PAD_=1000000000 python experiments/bench_scan.py --torch
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
  from mamba_pkd.ssm import ScanMethod, as_scan_method, selective_scan
except ImportError:  # run as a script from a checkout that is not pip-installed
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mamba_pkd.ssm import ScanMethod, as_scan_method, selective_scan

DEFAULT_SHAPES = "64,49,128,16;64,196,128,16;16,784,64,16"
CPU_METHODS = tuple(m.value for m in ScanMethod if m not in (ScanMethod.PALLAS, ScanMethod.AUTO))
MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("\n\n", 1)[1],
  )
  p.add_argument(
      "--shapes",
      default=DEFAULT_SHAPES,
      help="';'-separated batch,L,d_inner,N (default: %(default)s)",
  )
  p.add_argument(
      "--methods",
      default=None,
      help="comma-separated methods (default: sequential,parallel,chunked,fused,native"
      " and pallas on GPU or with --pallas_interpret)",
  )
  p.add_argument(
      "--rounds",
      type=int,
      default=3,
      help="rounds over all methods (median of rounds * per_round calls reported)",
  )
  p.add_argument("--per_round", type=int, default=3, help="timed calls per method per round")
  p.add_argument("--chunk_size", type=int, default=64, help="chunk_size of 'chunked'")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--pallas_interpret",
      action="store_true",
      help="on CPU, also time pallas through the Pallas interpreter (slow)",
  )
  p.add_argument("--torch", action="store_true", help="also time mambapy (see above)")
  p.add_argument(
      "--torch_seq",
      action="store_true",
      help="with --torch, also time mambapy's Python loop (very slow at L = 784)",
  )
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  args = p.parse_args(argv)
  try:
    args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
  except ValueError:
    p.error(f"--shapes={args.shapes!r}: expected e.g. {DEFAULT_SHAPES!r}")
  if not args.shapes or any(len(s) != 4 or min(s) < 1 for s in args.shapes):
    p.error(f"--shapes={args.shapes!r}: each shape needs 4 positive ints batch,L,d_inner,N")
  if args.rounds < 1 or args.per_round < 1:
    p.error("--rounds and --per_round must be >= 1")
  on_gpu = jax.default_backend() == "gpu"
  if args.methods is None:
    args.methods = list(CPU_METHODS) + (["pallas"] if on_gpu or args.pallas_interpret else [])
  else:
    args.methods = [m for m in args.methods.split(",") if m]
  try:
    args.methods = [as_scan_method(m, "--methods").value for m in args.methods]
  except ValueError as e:
    p.error(str(e))
  if "pallas" in args.methods and not (on_gpu or args.pallas_interpret):
    p.error("--methods pallas on CPU needs --pallas_interpret")
  return args


def make_inputs(shape, seed):
  """Float32 (u, delta, A, B, C, D, delta_bias, w) as NumPy arrays; w weights the loss."""
  batch, length, d_inner, n_state = shape
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  a_log = np.log(np.tile(np.arange(1, n_state + 1, dtype=np.float32), (d_inner, 1)))
  return dict(
      u=normal(batch, length, d_inner),
      delta=normal(batch, length, d_inner) - 2.0,
      A=-np.exp(a_log),  # S4D-real initialisation, as in Mamba
      B=normal(batch, length, n_state),
      C=normal(batch, length, n_state),
      D=np.ones(d_inner, np.float32),
      delta_bias=normal(d_inner) * 0.1,
      w=normal(batch, length, d_inner),
  )


def jax_functions(method, chunk_size):
  """(forward, forward+backward) jitted functions of (u, delta, A, B, C, D, bias, w)."""

  def forward(u, delta, A, B, C, D, bias, w):
    del w
    return selective_scan(
        u, delta, A, B, C, D, delta_bias=bias, method=method, chunk_size=chunk_size
    )

  def loss(u, delta, A, B, C, D, bias, w):
    return jnp.sum(w * forward(u, delta, A, B, C, D, bias, w))

  return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(7))))


def torch_functions(torch, variant, shape):
  """mambapy's selective scan as (forward, forward+backward) of torch tensors."""
  from mambapy import mamba as mambapy_mamba  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  block = mambapy_mamba.MambaBlock
  config = argparse.Namespace(d_inner=shape[2], d_state=shape[3])
  owner = argparse.Namespace(config=config)  # selective_scan_seq reads self.config only
  scan = block.selective_scan if variant == "pscan" else block.selective_scan_seq

  def forward(u, delta, A, B, C, D, bias):
    return scan(owner, u, F.softplus(delta + bias), A, B, C, D)

  def forward_no_grad(u, delta, A, B, C, D, bias, w):
    del w
    with torch.no_grad():
      return forward(u, delta, A, B, C, D, bias)

  def forward_backward(u, delta, A, B, C, D, bias, w):
    for x in (u, delta, A, B, C, D, bias):
      x.grad = None
    (w * forward(u, delta, A, B, C, D, bias)).sum().backward()
    return u.grad

  return forward_no_grad, forward_backward


def time_rounds(fns, args, rounds, per_round, sync):
  """Median wall and process-CPU seconds per function, {name: (wall, cpu)}.

  In each of ``rounds`` rounds every function runs once untimed and then
  ``per_round`` times timed, back to back. Rounds spread slow drifts in the
  machine's load over all functions alike, and the untimed call after each
  switch keeps one method's after-effects (e.g. the page faults that follow
  ``parallel`` freeing gigabytes) out of the next method's times. Process CPU
  time is less sensitive to time-slicing on a shared machine; it counts every
  thread of the process.
  """
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      sync(fn(*args[fn]))
      for _ in range(per_round):
        start, start_cpu = time.perf_counter(), time.process_time()
        sync(fn(*args[fn]))
        wall[name].append(time.perf_counter() - start)
        cpu[name].append(time.process_time() - start_cpu)
  return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def ratio(a, b):
  return f"{a / b:.2f}x" if a and b else "-"


def bench_shape(shape, args, torch):
  data = make_inputs(shape, args.seed)
  names = ("u", "delta", "A", "B", "C", "D", "delta_bias", "w")
  jargs = tuple(jnp.asarray(data[k]) for k in names)
  fns, call_args = {}, {}
  for method in args.methods:
    fwd, fwd_bwd = jax_functions(method, args.chunk_size)
    fns[(method, "fwd")], fns[(method, "fwd+bwd")] = fwd, fwd_bwd
    call_args[fwd] = call_args[fwd_bwd] = jargs
  y_ref = np.asarray(fns[(args.methods[0], "fwd")](*jargs))
  if "sequential" in args.methods:
    y_ref = np.asarray(fns[("sequential", "fwd")](*jargs))
  errors = {
      m: float(np.max(np.abs(np.asarray(fns[(m, "fwd")](*jargs)) - y_ref)) / np.max(np.abs(y_ref)))
      for m in args.methods
  }
  torch_errors = {}
  if torch is not None:
    targs = tuple(torch.tensor(data[k], requires_grad=(k != "w")) for k in names)
    for variant in ("pscan", "seq") if args.torch_seq else ("pscan",):
      fwd, fwd_bwd = torch_functions(torch, variant, shape)
      fns[(f"mambapy-{variant}", "fwd")], fns[(f"mambapy-{variant}", "fwd+bwd")] = fwd, fwd_bwd
      call_args[fwd] = call_args[fwd_bwd] = targs
      y = fwd(*targs).detach().numpy()
      torch_errors[f"mambapy-{variant}"] = float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))
  # JAX dispatches asynchronously: block on every output array (grads are a tuple).
  sync = (
      lambda x: x
      if torch is not None and isinstance(x, torch.Tensor)
      else (jax.block_until_ready(x))
  )
  results = time_rounds(fns, call_args, args.rounds, args.per_round, sync)
  torch_results = {k: results.pop(k) for k in list(results) if k[0].startswith("mambapy")}
  return results, errors, torch_results, torch_errors


def print_table(shape, methods, results, errors, torch_results, torch_errors):
  """Wall-clock table with speed-ups (x par = t(parallel) / t(method)); CPU ms beside."""
  both = {**results, **torch_results}
  t = lambda m, k, clock=0: both[(m, k)][clock] if (m, k) in both else None
  print(f"\n(batch, L, d_inner, N) = {shape}")
  print(
      f"{'method':<15}{'fwd ms':>9}{'f+b ms':>9}{'fwd x par':>10}{'f+b x par':>10}"
      f"{'fwd x seq':>10}{'f+b x seq':>10}{'rel err':>9}{'fwd cpu':>9}{'f+b cpu':>9}"
      f"{'f+b cpu x par':>14}"
  )
  rows = list(methods) + sorted({m for m, _ in torch_results})
  for m in rows:
    f, fb = t(m, "fwd"), t(m, "fwd+bwd")
    err = errors.get(m, torch_errors.get(m))
    print(
        f"{m:<15}{1e3 * f:>9.1f}{1e3 * fb:>9.1f}"
        f"{ratio(t('parallel', 'fwd'), f):>10}{ratio(t('parallel', 'fwd+bwd'), fb):>10}"
        f"{ratio(t('sequential', 'fwd'), f):>10}{ratio(t('sequential', 'fwd+bwd'), fb):>10}"
        f"{err:>9.1e}{1e3 * t(m, 'fwd', 1):>9.1f}{1e3 * t(m, 'fwd+bwd', 1):>9.1f}"
        f"{ratio(t('parallel', 'fwd+bwd', 1), t(m, 'fwd+bwd', 1)):>14}"
    )
  if torch_results:
    for ours in [m for m in ("native", "fused", "sequential", "pallas") if m in methods]:
      for theirs in sorted({m for m, _ in torch_results}):
        print(
            f"  ours/theirs (wall) {ours} / {theirs}: fwd {t(ours, 'fwd') / t(theirs, 'fwd'):.3f}, "
            f"fwd+bwd {t(ours, 'fwd+bwd') / t(theirs, 'fwd+bwd'):.3f}"
        )


def main(argv=None):
  args = parse_args(argv)
  torch = None
  if args.torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import mambapy  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      sys.exit(f"--torch needs `pip install torch==2.13.0 mambapy==1.2.0`: {e}")
    missing = {k: v for k, v in MALLOC_ENV.items() if os.environ.get(k) != v}
    if missing:
      print(
          "WARNING: glibc malloc is not tuned; torch times will be inflated. Set "
          + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
      )
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  cpus = len(os.sched_getaffinity(0))
  print(
      f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0]}, "
      f"{cpus} CPUs ({platform.processor() or platform.machine()}), python "
      f"{platform.python_version()}"
      + (f", torch {torch.__version__} with " f"{torch.get_num_threads()} threads" if torch else "")
  )
  malloc = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
  print(
      f"median of {args.rounds} rounds x {args.per_round} calls; glibc malloc "
      f"{'tuned (MALLOC_*)' if malloc else 'default'}; load average before: "
      f"{os.getloadavg()[0]:.2f}"
  )
  report = []
  for shape in args.shapes:
    results, errors, torch_results, torch_errors = bench_shape(shape, args, torch)
    print_table(shape, args.methods, results, errors, torch_results, torch_errors)
    report.append(
        dict(
            shape=shape,
            wall_ms={f"{m}/{k}": 1e3 * v[0] for (m, k), v in {**results, **torch_results}.items()},
            cpu_ms={f"{m}/{k}": 1e3 * v[1] for (m, k), v in {**results, **torch_results}.items()},
            rel_err={**errors, **torch_errors},
        )
    )
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
          dict(
              jax=jax.__version__,
              backend=jax.default_backend(),
              cpus=cpus,
              rounds=args.rounds,
              per_round=args.per_round,
              results=report,
          ),
          f,
          indent=1,
      )


if __name__ == "__main__":
  main()
