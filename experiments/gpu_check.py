"""GPU check of the Pallas selective-scan kernel: correctness, speed, bandwidth.

Run from the repository root on a CUDA machine (needs only jax and numpy):

    PYTHONPATH=. python3 experiments/gpu_check.py --out /tmp/gpu_check.txt

`--quick` uses fewer repeats and a smaller tile sweep. Expected runtime: about
2-3 minutes (mostly compilation); a time budget (`--budget_s`) skips the
optional smaller shapes rather than running past it.

Sections (each one's failure is printed with its traceback; the rest still run):
  1. JAX version and device.
  2. Compiled (not interpret) `selective_scan_pallas` against the
     `"sequential"` method: values and gradients of all inputs, float32 and
     bfloat16, including (64, 784, 256, 16).
  3. Median wall time of forward and forward+backward (jit, block_until_ready)
     of pallas (best of a block_d / num_warps / prefetch sweep), parallel
     (associative scan), chunked, fused and sequential at
     (batch, L, d_inner, N) = (64, 49, 128, 16), (64, 196, 128, 16),
     (16, 784, 64, 16), (64, 784, 256, 16). Bar: pallas forward+backward
     >= 5x faster than parallel at (64, 784, 256, 16).
  4. Achieved bandwidth of the forward kernel (u, delta, B, C read once, y
     written once, divided by its time) as a fraction of a measured
     device-to-device copy bandwidth (and of the nominal peak). Bar: >= 40%.
The table is also written to `--out`, line by line as it is produced.
"""

import argparse
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from mamba_pkd.ssm import pallas_scan
from mamba_pkd.ssm import scan

BIG = (64, 784, 256, 16)
SMALL, MID = (2, 37, 48, 16), (3, 100, 96, 12)  # correctness-only shapes
SHAPES = [(64, 49, 128, 16), (64, 196, 128, 16), (16, 784, 64, 16), BIG]
OTHER_METHODS = ("parallel", "chunked", "fused", "sequential")
NOMINAL_PEAK_BYTES_S = {"H100": 3.35e12, "H200": 4.8e12}
ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
INTERPRET = False  # True only for --dry_run (CPU check of this script)


class Report:
  """Prints lines and appends them to a file as they come."""

  def __init__(self, path):
    self.path = path
    if path:
      with open(path, "w") as f:
        f.write("")

  def line(self, text=""):
    print(text, flush=True)
    if self.path:
      with open(self.path, "a") as f:
        f.write(text + "\n")


def run_section(report, title, fn, *args):
  report.line("")
  report.line(f"== {title} ==")
  start = time.perf_counter()
  try:
    result = fn(report, *args)
  except Exception:  # pylint: disable=broad-except
    report.line(f"SECTION FAILED: {title}")
    for text in traceback.format_exc().splitlines():
      report.line("  " + text)
    result = None
  report.line(f"({title}: {time.perf_counter() - start:.1f} s)")
  return result


def make_args(shape, dtype=jnp.float32, seed=0):
  """Random inputs (u, delta, A, B, C, D, delta_bias) and a cotangent gy."""
  batch, seq_len, d_inner, n = shape
  keys = jax.random.split(jax.random.key(seed), 8)
  normal = lambda k, s: jax.random.normal(k, s, jnp.float32)
  u = normal(keys[0], (batch, seq_len, d_inner)).astype(dtype)
  delta = (normal(keys[1], (batch, seq_len, d_inner)) - 1.0).astype(dtype)
  A = -jnp.exp(0.5 * normal(keys[2], (d_inner, n)))
  B = normal(keys[3], (batch, seq_len, n)).astype(dtype)
  C = normal(keys[4], (batch, seq_len, n)).astype(dtype)
  D = normal(keys[5], (d_inner,))
  bias = 0.5 * normal(keys[6], (d_inner,))
  gy = normal(keys[7], (batch, seq_len, d_inner)).astype(dtype)
  return (u, delta, A, B, C, D, bias), gy


def scan_fn(method, reverse=False, **pallas_kwargs):
  """(u, delta, A, B, C, D, bias) -> y for a method name or the kernel."""
  if method == "pallas":

    def f(u, delta, A, B, C, D, bias):
      return pallas_scan.selective_scan_pallas(
          u,
          delta,
          A,
          B,
          C,
          D,
          delta_bias=bias,
          reverse=reverse,
          interpret=INTERPRET,
          **pallas_kwargs,
      )

  else:

    def f(u, delta, A, B, C, D, bias):
      return scan.selective_scan(
          u, delta, A, B, C, D, delta_bias=bias, reverse=reverse, method=method
      )

  return f


def value_and_vjp(f):
  """jit of (args, gy) -> (y, grads of all args)."""

  def run(args, gy):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(gy)

  return jax.jit(run)


def forward_backward(f):
  """jit of (args, gy) -> grads of all args (forward + backward)."""
  return jax.jit(lambda args, gy: jax.vjp(f, *args)[1](gy))


def rel_err(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def median_time(fn, *args, repeats):
  """(compile+first-call seconds, median seconds of `repeats` calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


# ----------------------------------------------------------------------------
# Sections.


def section_env(report):
  dev = jax.devices()[0]
  report.line(f"python {sys.version.split()[0]}, jax {jax.__version__}, " f"numpy {np.__version__}")
  report.line(
      f"default backend: {jax.default_backend()}, device: "
      f"{dev.device_kind} ({dev.platform}), {len(jax.devices())} "
      "device(s)"
  )
  ok, reason = pallas_scan.pallas_available(interpret=False)
  report.line(f"compiled pallas kernel available: {ok} {reason}")


def section_correctness(report):
  cases = [
      # shape, reverse, use D and bias, dtypes
      (SMALL, False, True, (jnp.float32, jnp.bfloat16)),
      (MID, True, False, (jnp.float32,)),
      (BIG, False, True, (jnp.float32, jnp.bfloat16)),
  ]
  tolerance = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
  all_ok = True
  report.line("relative error = max|pallas - sequential| / max|sequential|")
  for shape, reverse, use_d, dtypes in cases:
    for dtype in dtypes:
      (u, delta, A, B, C, D, bias), gy = make_args(shape, dtype)
      if not use_d:
        D, bias = jnp.zeros_like(D), jnp.zeros_like(bias)
      args = (u, delta, A, B, C, D, bias)
      y, grads = value_and_vjp(scan_fn("pallas", reverse))(args, gy)
      y_ref, grads_ref = value_and_vjp(scan_fn("sequential", reverse))(args, gy)
      errs = {"y": rel_err(y, y_ref)}
      errs.update(
          {f"d{name}": rel_err(g, g_ref) for name, g, g_ref in zip(ARG_NAMES, grads, grads_ref)}
      )
      worst = max(errs.values())
      ok = (
          worst <= tolerance[dtype]
          and y.dtype == u.dtype
          and all(g.dtype == a.dtype for g, a in zip(grads, args))
      )
      all_ok &= ok
      report.line(
          f"{'PASS' if ok else 'FAIL'} shape={shape} reverse={reverse} "
          f"dtype={jnp.dtype(dtype).name} tol={tolerance[dtype]:g} "
          + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
      )
  # The dispatcher's "auto" must pick the kernel on GPU.
  args, _ = make_args(SMALL)
  y_auto = jax.jit(lambda *a: scan.selective_scan(*a[:6], delta_bias=a[6], method="auto"))(*args)
  y_kernel = jax.jit(scan_fn("pallas"))(*args)
  same = bool(jnp.array_equal(y_auto, y_kernel))
  report.line(
      f"selective_scan(method='auto') identical to the kernel: {same} "
      f"(relative difference {rel_err(y_auto, y_kernel):.1e})"
  )
  report.line(f"CORRECTNESS {'PASS' if all_ok else 'FAIL'}")


# A pallas config: (block_d, num_warps, prefetch, prefetch_bwd); None = the
# module's default for that knob.
def pallas_configs(shape, quick, big):
  """Forward configs to time at one shape, and extra forward+backward ones."""
  d_inner = shape[2]
  block_ds = [b for b in (8, 16, 32, 64) if b <= d_inner]
  default_pf = pallas_scan.DEFAULT_PREFETCH
  fwd = [(b, None, default_pf, None) for b in block_ds]
  fb_extra = []
  if big and not quick:
    fwd = [(b, w, default_pf, None) for b in block_ds for w in (1, 2, 4)]
    fwd += [
        (8, None, 0, None),
        (8, None, 2, None),
        (8, None, 8, None),
        (16, None, 2, None),
        (16, None, 8, None),
        (32, None, 2, None),
    ]
    fb_extra = [
        (8, None, default_pf, 1),
        (8, None, default_pf, 4),
        (8, None, 8, None),
        (16, None, default_pf, 1),
    ]
  return fwd, fb_extra


def pallas_fn(cfg):
  block_d, num_warps, prefetch, prefetch_bwd = cfg
  return scan_fn(
      "pallas", block_d=block_d, num_warps=num_warps, prefetch=prefetch, prefetch_bwd=prefetch_bwd
  )


def config_str(cfg):
  return "block_d={} num_warps={} prefetch={} prefetch_bwd={}".format(*cfg)


def time_shape(report, shape, quick, big, results):
  """Times every method at one shape; fills results[shape]."""
  repeats = 5 if quick else 15
  args, gy = make_args(shape)
  row = {}
  fwd_cfgs, fb_extra = pallas_configs(shape, quick, big)
  # Pallas sweep: forward for every config; forward+backward for the
  # default-warps configs, the extra backward variants and the best forward.
  fwd = {}
  for cfg in fwd_cfgs:
    try:
      first, t = median_time(jax.jit(pallas_fn(cfg)), *args, repeats=repeats)
      fwd[cfg] = t
      report.line(
          f"  pallas fwd      {shape} {config_str(cfg)}: "
          f"{t * 1e3:8.3f} ms (first call {first:.1f} s)"
      )
    except Exception as e:  # pylint: disable=broad-except
      report.line(
          f"  pallas fwd {config_str(cfg)} FAILED: "
          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      )
  best_fwd = min(fwd, key=fwd.get) if fwd else None
  fb_cfgs = [c for c in fwd if c[1] is None and c[2] != 0] + fb_extra
  if best_fwd is not None:
    fb_cfgs.append(best_fwd)
  fb_cfgs = list(dict.fromkeys(fb_cfgs))  # drop repeats, keep order
  fb = {}
  for cfg in fb_cfgs:
    try:
      first, t = median_time(forward_backward(pallas_fn(cfg)), args, gy, repeats=repeats)
      fb[cfg] = t
      report.line(
          f"  pallas fwd+bwd  {shape} {config_str(cfg)}: "
          f"{t * 1e3:8.3f} ms (first call {first:.1f} s)"
      )
    except Exception as e:  # pylint: disable=broad-except
      report.line(
          f"  pallas fwd+bwd {config_str(cfg)} FAILED: "
          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      )
  best_fb = min(fb, key=fb.get) if fb else None
  default_cfg = (None, None, pallas_scan.DEFAULT_PREFETCH, None)
  try:  # the module defaults, as selective_scan(method="pallas") runs them
    _, t_def_fwd = median_time(jax.jit(pallas_fn(default_cfg)), *args, repeats=repeats)
    _, t_def_fb = median_time(forward_backward(pallas_fn(default_cfg)), args, gy, repeats=repeats)
  except Exception as e:  # pylint: disable=broad-except
    report.line(f"  pallas defaults FAILED: {type(e).__name__}: " f"{str(e).splitlines()[0][:300]}")
    t_def_fwd = t_def_fb = None
  report.line(
      f"  pallas defaults {shape}: fwd {fmt_ms(t_def_fwd)} ms, " f"fwd+bwd {fmt_ms(t_def_fb)} ms"
  )
  row["pallas"] = (fwd.get(best_fwd), fb.get(best_fb), best_fwd, best_fb)
  row["pallas-default"] = (t_def_fwd, t_def_fb, None, None)
  for method in OTHER_METHODS:
    f = scan_fn(method)
    times = []
    for fn, fn_args in ((jax.jit(f), args), (forward_backward(f), (args, gy))):
      try:
        _, t = median_time(fn, *fn_args, repeats=max(3, repeats // 3))
      except Exception as e:  # pylint: disable=broad-except
        report.line(
            f"  {method} {shape} FAILED: {type(e).__name__}: " f"{str(e).splitlines()[0][:300]}"
        )
        t = None
      times.append(t)
    row[method] = (times[0], times[1], None, None)
    report.line(
        f"  {method:10s} {shape}: fwd {fmt_ms(times[0])} ms, " f"fwd+bwd {fmt_ms(times[1])} ms"
    )
  results[shape] = row


def fmt_ms(t):
  return "   n/a  " if t is None else f"{t * 1e3:8.3f}"


def fmt_ratio(t, ref):
  return "   n/a" if t is None or ref is None else f"{t / ref:6.1f}x"


def section_timing(report, quick, budget_s, start_time, results):
  shapes = [BIG] + [s for s in SHAPES if s != BIG]
  for shape in shapes:
    elapsed = time.perf_counter() - start_time
    if shape != BIG and elapsed > budget_s:
      report.line(f"  skipped {shape}: {elapsed:.0f} s elapsed > budget " f"{budget_s:.0f} s")
      continue
    time_shape(report, shape, quick, shape == BIG, results)


def section_table(report, results):
  report.line(
      "median ms; ratio = method time / pallas time (higher = pallas "
      "faster); pallas = best swept config, pallas-default = module "
      "defaults"
  )
  report.line(
      f"{'shape (b, L, d, N)':22s} {'method':14s} {'fwd ms':>9s} "
      f"{'fwd+bwd ms':>11s} {'fwd ratio':>9s} {'f+b ratio':>9s}"
  )
  for shape in SHAPES:
    if shape not in results:
      continue
    row = results[shape]
    p_fwd, p_fb, best_fwd, best_fb = row["pallas"]
    for method in ("pallas", "pallas-default") + OTHER_METHODS:
      t_fwd, t_fb, _, _ = row[method]
      report.line(
          f"{str(shape):22s} {method:14s} {fmt_ms(t_fwd):>9s} "
          f"{fmt_ms(t_fb):>11s} {fmt_ratio(t_fwd, p_fwd):>9s} "
          f"{fmt_ratio(t_fb, p_fb):>9s}"
      )
    report.line(
        f"{'':22s} best pallas (block_d, num_warps, prefetch, "
        f"prefetch_bwd): fwd {best_fwd}, fwd+bwd {best_fb}"
    )
  if BIG in results:
    p_fb = results[BIG]["pallas"][1]
    par_fb = results[BIG]["parallel"][1]
    if p_fb is not None and par_fb is not None:
      speedup = par_fb / p_fb
      report.line(
          f"BAR fwd+bwd speedup of pallas over parallel at {BIG}: "
          f"{speedup:.1f}x (bar >= 5x): "
          f"{'PASS' if speedup >= 5 else 'FAIL'}"
      )
    else:
      report.line(f"BAR fwd+bwd speedup at {BIG}: not measured")


def section_bandwidth(report, quick, results):
  dev = jax.devices()[0]
  # Peak: large device-to-device elementwise copies (read + write once).
  copy = jax.jit(lambda a: a + 1.0)
  peak = 0.0
  for log2_n in ((20,) if INTERPRET else (26, 28, 29)):  # 256 MiB..2 GiB
    x = jnp.ones((1 << log2_n,), jnp.float32)
    _, t_copy = median_time(copy, x, repeats=5 if quick else 20)
    bw = 2 * x.size * 4 / t_copy
    report.line(f"copy of {x.size * 4 >> 20} MiB: {t_copy * 1e3:.3f} ms, " f"{bw / 1e12:.2f} TB/s")
    peak = max(peak, bw)
    del x
  nominal = next((v for k, v in NOMINAL_PEAK_BYTES_S.items() if k in dev.device_kind), None)
  report.line(
      f"measured copy bandwidth (best of the above): "
      f"{peak / 1e12:.2f} TB/s; nominal peak for {dev.device_kind}: "
      + (f"{nominal / 1e12:.2f} TB/s" if nominal else "unknown")
  )
  batch, seq_len, d_inner, n_state = BIG
  best = results.get(BIG, {}).get("pallas", (None, None, None, None))
  cfg = best[2] or (None, None, pallas_scan.DEFAULT_PREFETCH, None)
  fraction = None
  for dtype in (jnp.float32, jnp.bfloat16):
    args, _ = make_args(BIG, dtype)
    _, t = median_time(jax.jit(pallas_fn(cfg)), *args, repeats=5 if quick else 20)
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = itemsize * (3 * batch * seq_len * d_inner + 2 * batch * seq_len * n_state)
    bw = nbytes / t
    frac = bw / peak
    if dtype == jnp.float32:
      fraction = frac
    report.line(
        f"pallas forward {BIG} {jnp.dtype(dtype).name} {config_str(cfg)}: "
        f"{t * 1e3:.3f} ms, {nbytes / 1e6:.1f} MB -> {bw / 1e12:.2f} TB/s = "
        f"{100 * frac:.0f}% of measured copy"
        + (f", {100 * bw / nominal:.0f}% of nominal" if nominal else "")
    )
  report.line(
      f"BAR forward bandwidth (float32) >= 40% of measured copy: "
      f"{100 * fraction:.0f}%: {'PASS' if fraction >= 0.4 else 'FAIL'}"
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller tile sweep")
  parser.add_argument("--out", default="", help="also write the report here")
  parser.add_argument(
      "--budget_s",
      type=float,
      default=170.0,
      help="skip the smaller timing shapes after this many " "seconds",
  )
  parser.add_argument(
      "--dry_run",
      action="store_true",
      help="tiny shapes, interpreted kernel: checks this "
      "script on a CPU; its numbers mean nothing",
  )
  opts = parser.parse_args(argv)
  if opts.dry_run:
    global BIG, SHAPES, SMALL, MID, INTERPRET
    BIG, SMALL, MID, INTERPRET = (2, 9, 32, 16), (1, 5, 16, 16), (1, 6, 8, 4), True
    SHAPES = [(2, 5, 16, 16), BIG]
  start = time.perf_counter()
  report = Report(opts.out)
  results = {}
  run_section(report, "1. environment", section_env)
  run_section(report, "2. correctness: compiled pallas vs sequential", section_correctness)
  run_section(report, "3. timing", section_timing, opts.quick, opts.budget_s, start, results)
  run_section(report, "4. forward bandwidth", section_bandwidth, opts.quick, results)
  run_section(report, "3. timing table", section_table, results)
  report.line(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
