r"""Model-level benchmark: one training step of the teacher config, ours vs mambapy.

The model (the project's default ``ModelConfig``): 28x28x1 images, 4x4 patches
-> 49 tokens, d_model 64, 4 Mamba layers, d_state 16, expand 2, d_conv 4,
unidirectional, mean-pool over tokens, 10-class head. One training step is the
forward pass, softmax cross-entropy, the backward pass and an AdamW update, on
a batch of random normalised images [batch, 28, 28, 1] and random labels.

Timed, all in one command (median wall time of ``--repeats`` steps after
warm-up steps, each synchronised with ``block_until_ready``/the torch call):

  * ours-native, ours-fused, ours-sequential: a ``jax.jit`` step (``value_and_grad``
    of ``mamba_pkd.losses.cross_entropy`` + ``optax.adamw``) on one XLA device,
    for ``scan_method`` "native" (the C++ kernel, what "auto" picks on a CPU where
    it builds), "fused" and "sequential", in this process;
  * ours-native-Kdev, ours-fused-Kdev (``--cpu_devices K`` > 1): the project's own step
    (``mamba_pkd.train.make_train_step`` with a hard-label loss and plain AdamW,
    pmapped by ``mamba_pkd.parallel.data_parallel``) on K host devices, in a
    subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=K``.
    XLA's CPU backend runs the scan's chains of small ops on one thread, so one
    device leaves cores idle; the project's ``main`` splits the cores into
    devices by default (``--cpu_devices -1``);
  * mambapy: ``mambapy.mamba.Mamba(MambaConfig(...))`` (its default parallel
    scan, ``pscan=True``) between the same patch embedding (a Linear on 4x4
    patches, plus a learned position embedding) and a final RMSNorm, mean-pool
    and Linear(64, 10), so that the two models have the same structure; a
    ``torch.optim.AdamW`` step; ``torch.set_num_threads`` = the cores this
    process may use. It runs in subprocesses, because glibc reads the malloc
    variables only at process start: once with the tuned settings

        MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1000000000

    (without them torch page-faults its large temporaries in on every step),
    with the tuned settings and one thread (``--no_one_thread`` skips it), and
    with glibc's defaults (``--no_default_malloc`` skips that run). The 1-thread
    run is there because on a loaded machine torch's OpenMP threads wait on each
    other: measured here under load ~4-5 on 2 cores, mambapy took 7.1 s/step with
    2 threads and 1.8 s/step with 1.

The ratio column is t(mambapy) / t(row) with the faster of mambapy's
tuned-malloc runs as reference; the bars are ours (the fastest ours-native or
ours-fused row) >= 2x (issue 5) and >= 6x (issue 14) faster than that. Timings on a shared machine vary between runs: compare rows
of one run only. The 1-minute load average is printed before and after.

It needs the benchmark extras (never project dependencies; an unpinned torch
pulls a multi-GB CUDA build):

    pip install torch==2.13.0 mambapy==1.2.0

Usage (from the repository root; about 1-2 min on 2 CPU cores):

    python experiments/bench_model.py
    python experiments/bench_model.py --batch 128 --repeats 10 --cpu_devices 2
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}
IMAGE_SHAPE = (28, 28, 1)
PATCH = 4
NUM_CLASSES = 10
MODEL = dict(d_model=64, n_layers=4, d_state=16, expand=2, d_conv=4)
SINGLE_METHODS = ("native", "fused", "sequential")
PMAP_METHODS = ("native", "fused")
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("\n\n", 1)[1],
  )
  p.add_argument("--batch", type=int, default=128, help="global batch size")
  p.add_argument("--repeats", type=int, default=5, help="timed steps per row (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument(
      "--cpu_devices",
      type=int,
      default=None,
      help="also time the pmapped step on this many host devices "
      "(default: the core count; 0 or 1: skip)",
  )
  p.add_argument(
      "--no_default_malloc",
      action="store_true",
      help="skip the mambapy run with glibc's default malloc settings",
  )
  p.add_argument(
      "--no_one_thread",
      action="store_true",
      help="skip the mambapy run with torch.set_num_threads(1)",
  )
  p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  p.add_argument("--_worker", default=None, choices=("pmap", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--method", default="native", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.batch < 1:
    p.error(f"--batch must be >= 1, got {args.batch}")
  if args.repeats < 1 or args.warmup < 0:
    p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
  if args.cpu_devices is None:
    args.cpu_devices = num_cores()
  if args.cpu_devices < 0:
    p.error(f"--cpu_devices must be >= 0, got {args.cpu_devices}")
  if args.cpu_devices > 1 and args.batch % args.cpu_devices:
    p.error(f"--batch={args.batch} must be divisible by --cpu_devices={args.cpu_devices}")
  return args


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


def load_average() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cpus"


def make_batch(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Random normalised images [batch, 28, 28, 1] float32 and labels [batch] int32."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32)
  return images, labels


def time_steps(step, warmup: int, repeats: int) -> dict:
  """Runs ``step()`` (synchronising) 1 + warmup times untimed, then times ``repeats`` calls.

  Returns:
    {"compile_s": first call's seconds, "ms": median ms, "min_ms", "max_ms"}.
  """
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return dict(
      compile_s=first,
      ms=1e3 * statistics.median(times),
      min_ms=1e3 * min(times),
      max_ms=1e3 * max(times),
  )


# ----------------------------------------------------------------------------
# Ours (JAX).
# ----------------------------------------------------------------------------


def model_config(method: str):
  from mamba_pkd.models import ModelConfig  # pylint: disable=g-import-not-at-top

  return ModelConfig(
      image_shape=IMAGE_SHAPE,
      num_classes=NUM_CLASSES,
      patch_size=PATCH,
      bidirectional=False,
      pool="mean",
      scan_method=method,
      **MODEL,
  )


def bench_ours_jit(method: str, args) -> dict:
  """A jitted single-device step: value_and_grad of cross-entropy + AdamW."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mamba_pkd import losses, models  # pylint: disable=g-import-not-at-top

  cfg = model_config(method)
  model = models.create_model(cfg)
  params = models.init_params(cfg, jax.random.key(args.seed))
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  images, labels = (jax.device_put(x) for x in make_batch(args.batch, args.seed))

  @jax.jit
  def train_step(params, opt_state, images, labels):
    def loss_fn(p):
      return losses.cross_entropy(model.apply({"params": p}, images), labels)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, tx.init(params)]

  def step():
    state[0], state[1], loss = train_step(state[0], state[1], images, labels)
    jax.block_until_ready((state[0], loss))

  result = time_steps(step, args.warmup, args.repeats)
  result["n_params"] = models.count_tree_params(params)
  return result


def bench_ours_pmap(args) -> dict:
  """The project's pmapped step (``train.make_train_step``) on all local devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mamba_pkd import losses, models, parallel, train  # pylint: disable=g-import-not-at-top

  cfg = model_config(args.method)
  devices = jax.local_device_count()
  params = models.init_params(cfg, jax.random.key(args.seed))
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  step_fn = parallel.data_parallel(
      train.make_train_step(cfg, tx, losses.hard(), train.FrozenSpec()), donate_first=True
  )
  images, labels = make_batch(args.batch, args.seed)
  per = args.batch // devices
  batch = {
      "image": images.reshape(devices, per, *IMAGE_SHAPE),
      "label": labels.reshape(devices, per),
  }
  batch = jax.pmap(lambda x: x)(batch)  # placed on the devices once, like the data in ours-jit
  frozen = parallel.replicate(train.Frozen())
  rngs = parallel.device_keys(jax.random.key(args.seed))
  state = [parallel.replicate(train.create_train_state(params, tx))]

  def step():
    state[0], metrics = step_fn(state[0], batch, frozen, rngs)
    jax.block_until_ready((state[0], metrics))

  result = time_steps(step, args.warmup, args.repeats)
  result["devices"] = devices
  return result


# ----------------------------------------------------------------------------
# Theirs (mambapy, torch).
# ----------------------------------------------------------------------------


def bench_torch(args) -> dict:
  """mambapy's Mamba in the same classifier; forward, CE, backward, AdamW step."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from mambapy import mamba as mambapy_mamba  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads or num_cores())
  torch.manual_seed(args.seed)
  num_tokens = (IMAGE_SHAPE[0] // PATCH) * (IMAGE_SHAPE[1] // PATCH)
  d_model = MODEL["d_model"]

  class Classifier(nn.Module):
    """Patches -> Linear -> + pos -> mambapy Mamba -> RMSNorm -> mean -> Linear."""

    def __init__(self):
      super().__init__()
      config = mambapy_mamba.MambaConfig(
          d_model=d_model,
          n_layers=MODEL["n_layers"],
          d_state=MODEL["d_state"],
          expand_factor=MODEL["expand"],
          d_conv=MODEL["d_conv"],
          pscan=True,
      )
      self.patch_embed = nn.Linear(PATCH * PATCH * IMAGE_SHAPE[2], d_model)
      self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_tokens, d_model))
      self.mamba = mambapy_mamba.Mamba(config)
      self.norm_f = mambapy_mamba.RMSNorm(d_model)
      self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, images):  # images [B, H, W, C]
      b, h, w, c = images.shape
      patches = images.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
      patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(b, num_tokens, PATCH * PATCH * c)
      hidden = self.mamba(self.patch_embed(patches) + self.pos_embed)  # [B, L, D]
      return self.head(self.norm_f(hidden).mean(dim=1))  # [B, K]

  model = Classifier()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  images, labels = make_batch(args.batch, args.seed)
  images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    loss.item()

  result = time_steps(step, args.warmup, args.repeats)
  result.update(
      threads=torch.get_num_threads(),
      torch=torch.__version__,
      n_params=sum(p.numel() for p in model.parameters()),
      malloc={k: os.environ.get(k) for k in MALLOC_ENV},
  )
  return result


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------


def run_worker(
    kind: str, args, env_changes: dict, drop: tuple = (), threads: int = 0, method: str = "native"
) -> dict:
  """Runs this script with ``--_worker kind`` in a fresh process; returns its JSON."""
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(env_changes)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--_worker",
      kind,
      "--batch",
      str(args.batch),
      "--repeats",
      str(args.repeats),
      "--warmup",
      str(args.warmup),
      "--cpu_devices",
      str(args.cpu_devices),
      "--seed",
      str(args.seed),
      "--method",
      method,
  ] + (["--threads", str(threads)] if threads else [])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    print(f"worker {kind} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return {"error": f"rc {proc.returncode}"}
  return json.loads(lines[-1][len("RESULT ") :])


def worker_main(args) -> None:
  result = bench_ours_pmap(args) if args._worker == "pmap" else bench_torch(args)  # pylint: disable=protected-access
  print("RESULT " + json.dumps(result), flush=True)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    worker_main(args)
    return
  sys.path.insert(0, REPO)
  load_before = load_average()
  cores = num_cores()
  print(
      f"bench_model: batch {args.batch}, 49 tokens, d_model 64, 4 layers, d_state 16, "
      f"expand 2, d_conv 4, mean-pool + 10-class head; one step = fwd + CE + bwd + AdamW"
  )
  print(
      f"machine: {platform.processor() or platform.machine()}, {cores} usable cores; "
      f"median of {args.repeats} steps after {args.warmup} warm-up steps"
  )
  print(f"load average before: {load_before}")

  rows = {}  # name -> result dict
  no_fork_flag = {
      "XLA_FLAGS": " ".join(
          f
          for f in os.environ.get("XLA_FLAGS", "").split()
          if "xla_force_host_platform_device_count" not in f
      )
  }
  import jax  # pylint: disable=g-import-not-at-top

  if jax.local_device_count() != 1:
    print(f"note: this process has {jax.local_device_count()} JAX devices; the jit rows use one")
  for method in SINGLE_METHODS:
    rows[f"ours-{method} (jit, 1 device)"] = bench_ours_jit(method, args)
  if args.cpu_devices > 1:
    flags = f"{no_fork_flag['XLA_FLAGS']} --xla_force_host_platform_device_count={args.cpu_devices}"
    for method in PMAP_METHODS:
      rows[f"ours-{method}-{args.cpu_devices}dev (pmap train step)"] = run_worker(
          "pmap", args, {"XLA_FLAGS": flags.strip()}, method=method
      )
  tuned_name = f"mambapy (tuned malloc, {cores} thr)"
  rows[tuned_name] = run_worker("torch", args, MALLOC_ENV)
  tuned_names = [tuned_name]
  if not args.no_one_thread and cores > 1:
    tuned_names.append("mambapy (tuned malloc, 1 thr)")
    rows[tuned_names[-1]] = run_worker("torch", args, MALLOC_ENV, threads=1)
  if not args.no_default_malloc:
    rows[f"mambapy (default malloc, {cores} thr)"] = run_worker(
        "torch", args, {}, drop=tuple(MALLOC_ENV)
    )
  load_after = load_average()

  # The reference is mambapy's faster tuned-malloc run: on a loaded machine torch's
  # OpenMP threads can wait on each other far longer than one thread takes.
  tuned = {n: rows[n]["ms"] for n in tuned_names if "ms" in rows[n]}
  theirs_name = min(tuned, key=tuned.get) if tuned else None
  theirs = tuned.get(theirs_name)
  print()
  header = f"{'row':<36} {'ms/step':>9} {'images/s':>9} {'mambapy/ours':>13} {'first call s':>13}"
  print(header)
  print("-" * len(header))
  for name, r in rows.items():
    if "ms" not in r:
      print(f"{name:<36} {'failed: ' + r.get('error', '?'):>9}")
      continue
    ratio = f"{theirs / r['ms']:.2f}x" if theirs else "-"
    print(
        f"{name:<36} {r['ms']:>9.1f} {1e3 * args.batch / r['ms']:>9.0f} {ratio:>13} "
        f"{r['compile_s']:>13.1f}"
    )
  print()
  for name, r in rows.items():
    if "ms" in r:
      extra = {k: r[k] for k in ("devices", "threads", "torch", "n_params") if k in r}
      print(f"  {name}: min {r['min_ms']:.1f} / max {r['max_ms']:.1f} ms {extra or ''}")
  print(
      f"  ratio column = t({theirs_name}) / t(row), the faster mambapy tuned-malloc run; "
      f"mambapy's torch.set_num_threads = {cores} (the usable cores) unless it says 1 thr; "
      "ours-*-jit use one XLA device."
  )
  print("  Timings on this shared machine vary between runs: compare rows within one run only.")
  print(f"load average after:  {load_after}")

  ours = {
      n: r["ms"]
      for n, r in rows.items()
      if n.startswith(("ours-native", "ours-fused")) and "ms" in r
  }
  for bar, issue in ((2.0, 5), (6.0, 14)):
    if ours and theirs:
      best_name = min(ours, key=ours.get)
      best = ours[best_name]
      verdict = "PASS" if theirs / best >= bar else "FAIL"
      print(
          f"BAR (issue {issue}) ours >= {bar:g}x faster than mambapy: {verdict}"
          f" ({theirs / best:.2f}; {best_name} vs {theirs_name})"
      )
    else:
      print(f"BAR (issue {issue}) ours >= {bar:g}x faster than mambapy: FAIL (a run failed)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
          dict(rows=rows, batch=args.batch, load_before=load_before, load_after=load_after),
          f,
          indent=1,
      )


if __name__ == "__main__":
  main()
