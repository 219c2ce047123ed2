r"""Profile of one teacher and one student training step on the CPU, beside the machine's limits.

Times jitted pieces in isolation at the real shapes of one step of the default
run (configs/default.py: teacher d_model 64 x 4 bidirectional layers, 49 tokens;
student s5 of the mnist ladder: d_model 48 x 2 layers, d_state 16, 16 tokens;
batch 128, scan_method "auto": "native" on a CPU where its kernel builds, else "fused"):

  * the project's own step (``train.make_train_step``, ``train.create_optimizer``
    with the config's settings, pmapped by ``parallel.data_parallel``) on 1 and
    on 2 host devices (the run's default splits the 2 cores into 2 devices);
  * single-device jit pieces: forward, forward+backward (no optimizer), the
    optimizer update alone, the selective scan of one layer (both directions,
    one fused call) forward and forward+backward, the projections of one layer
    (in_proj, x_proj x2, dt_proj x2, out_proj) as matmuls, the two depthwise
    convs of one layer with their SiLU (gradient from the native kernel where the
    scan is native, as in the mixer), one RMSNorm;
  * host work: one epoch of ``data.train_batches`` (shift augmentation) per
    batch, and ``jax.device_put`` of a batch; dispatch: a trivial jitted call;
  * the roofline: float32 matmuls (1024^3 and the step's in_proj shape) and an
    in-place elementwise add (donated buffer) over 64 Mi floats (256 MiB read,
    256 MiB written: DRAM) and over 1.6 Mi floats (6 MiB: a teacher activation,
    mostly cache), on both cores
    and, in a subprocess, on one core (``taskset -c 0`` plus
    ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``).

Pieces of one group are timed in interleaved rounds (every piece once per
round), and the median and minimum are reported; the 1-minute load average is
printed beside every group. FLOPs are analytic (``mamba_pkd.flops`` per-part
counts; matmul 2MKN; backward counted as 2x forward, so fwd+bwd = 3x fwd);
bytes are XLA's ``cost_analysis()['bytes accessed']`` of the compiled piece
(XLA counts a while loop's body once, not once per iteration, so the bytes of
the fused scan, a loop over time, and of anything containing it are lower
bounds).

Usage (from the repository root, about 2 min on 2 CPU cores; docs/performance.md reads it):

    python experiments/profile_step.py --json docs/results/profile_step.json \
        --markdown docs/results/profile_step.md
    python experiments/profile_step.py --render docs/results/profile_step.json  # tables only
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_FLAGS", "")
if "--_single_core" not in sys.argv and "device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

BATCH = 128


def load() -> float:
  return round(os.getloadavg()[0], 2)


def block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def bytes_accessed(fn, *args) -> float | None:
  try:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("bytes accessed", 0.0)) or None
  except Exception:  # noqa: BLE001  (cost analysis is optional)
    return None


def time_group(pieces: dict, rounds: int) -> dict:
  """pieces: name -> zero-arg callable (returns arrays). Interleaved rounds; ms median/min."""
  for call in pieces.values():  # compile + one warm-up
    block(call())
    block(call())
  times = {name: [] for name in pieces}
  load_before = load()
  for _ in range(rounds):
    for name, call in pieces.items():
      start = time.perf_counter()
      block(call())
      times[name].append(1e3 * (time.perf_counter() - start))
  return {
      name: {"ms": statistics.median(t), "min_ms": min(t), "load": [load_before, load()]}
      for name, t in times.items()
  }


# ----------------------------------------------------------------------------
# Roofline.
# ----------------------------------------------------------------------------


def roofline(rounds: int) -> dict:
  k = jax.random.key(0)
  a = jax.random.normal(k, (1024, 1024), jnp.float32)
  x_in = jax.random.normal(k, (BATCH * 49, 64), jnp.float32)
  w_in = jax.random.normal(k, (64, 256), jnp.float32)
  # Bandwidth: x + 1 written back into the donated input buffer (no fresh output pages to
  # fault in), over 256 MiB (DRAM) and over 6 MiB (a teacher activation [128, 49, 256]).
  mm = jax.jit(lambda p, q: p @ q)
  add = jax.jit(lambda v: v + 1.0, donate_argnums=0)
  buffers = {
      "big": jnp.ones((64 * 1024 * 1024,), jnp.float32),
      "act": jnp.ones((BATCH * 49 * 256,), jnp.float32),
  }

  def add_in_place(key):
    buffers[key] = add(buffers[key])
    return buffers[key]

  res = time_group(
      {
          "matmul 1024^3": lambda: mm(a, a),
          "matmul in_proj 6272x64x256": lambda: mm(x_in, w_in),
          "add 64Mi f32 (256 MiB, in place)": lambda: add_in_place("big"),
          "add 1.6Mi f32 (6 MiB, in place)": lambda: add_in_place("act"),
      },
      rounds,
  )
  res["matmul 1024^3"]["flops"] = 2 * 1024**3
  res["matmul in_proj 6272x64x256"]["flops"] = 2 * BATCH * 49 * 64 * 256
  for key, name in (
      ("big", "add 64Mi f32 (256 MiB, in place)"),
      ("act", "add 1.6Mi f32 (6 MiB, in place)"),
  ):
    res[name]["bytes"] = 2 * 4 * buffers[key].size
    res[name]["flops"] = buffers[key].size
  return res


# ----------------------------------------------------------------------------
# Step pieces.
# ----------------------------------------------------------------------------


def fwd_bwd_of(fn):
  """``(args, cotangent) -> (outputs, input cotangents)``: the forward and its vjp, as a
  training step runs them (no extra loss tail)."""

  def run(args, ct):
    out, vjp = jax.vjp(fn, args)
    return out, vjp(ct)

  return run


def model_pieces(name: str, cfg, optim, stage_loss, cached: bool) -> tuple[dict, dict]:
  """Returns (pieces, facts) for one model config: name -> callable; facts: flops/bytes."""
  from mamba_pkd import flops as flops_lib
  from mamba_pkd import layers, losses, models, parallel, train
  from mamba_pkd.ssm import ScanMethod, selective_scan_streams
  from mamba_pkd.ssm.scan import resolve_method

  rng = np.random.default_rng(0)
  b, length, d, e = BATCH, cfg.num_tokens, cfg.d_model, cfg.d_inner
  n, r, kconv = cfg.d_state, cfg.resolved_dt_rank, cfg.d_conv
  m = b * length
  params = models.init_params(cfg, jax.random.key(0))
  model = models.create_model(cfg)
  images = jnp.asarray(rng.standard_normal((b, *cfg.image_shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, b), jnp.int32)
  batch = {"image": images, "label": labels}
  if cached:
    batch["teacher_logits"] = jnp.asarray(rng.standard_normal((b, 10)), jnp.float32)
  tx = train.create_optimizer(optim, total_steps=1000)
  state = train.create_train_state(params, tx)
  step = train.make_train_step(cfg, tx, stage_loss, train.FrozenSpec())
  pieces, facts = {}, {}

  for ndev in (1, 2):
    devices = jax.devices()[:ndev]
    if len(devices) < ndev:
      continue
    pstep = jax.pmap(step, axis_name=parallel.AXIS, devices=devices)
    place = jax.pmap(lambda t: t, devices=devices)  # arrays placed as a pmapped step returns them

    def stacked(tree, nd=ndev):
      return jax.tree.map(lambda v: np.broadcast_to(np.asarray(v), (nd, *np.shape(v))), tree)

    rep_state = place(stacked(state))
    shard = place(
        jax.tree.map(lambda v, nd=ndev: np.asarray(v).reshape(nd, -1, *v.shape[1:]), batch)
    )
    frozen = train.Frozen()
    rngs = place(stacked(jax.random.key_data(jax.random.key(0))))
    pieces[f"train step, {ndev} device(s) (pmap)"] = (
        lambda f=pstep, s=rep_state, bt=shard, fz=frozen, rg=rngs: f(s, bt, fz, rg)
    )

  def loss_fn(p):
    logits = model.apply({"params": p}, batch["image"])
    named = {"student": logits}
    if cached:
      named["teacher"] = batch["teacher_logits"]
    return stage_loss(named, batch["label"], None)[0]

  fwd = jax.jit(loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
  grads = jax.grad(loss_fn)(params)

  def opt_update(g, s, p):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  opt = jax.jit(opt_update)
  pieces["forward (loss), 1 device"] = lambda: fwd(params)
  pieces["forward+backward, 1 device"] = lambda: fwd_bwd(params)
  pieces["optimizer update (clip+adamw)"] = lambda: opt(grads, state.opt_state, params)

  # The scan of one layer: both directions in one call, as the mixer makes it.
  def rnd(*shape):
    return jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.float32)

  branches = 2 if cfg.bidirectional else 1
  streams = [
      (
          rnd(b, length, e),
          rnd(b, length, e),
          -jnp.exp(rnd(e, n)),
          rnd(b, length, n),
          rnd(b, length, n),
          rnd(e),
          None,
      )
      for _ in range(branches)
  ]

  def scan_fn(streams):
    return selective_scan_streams(
        streams, reverse=[False] * len(streams), delta_softplus=True, method=cfg.scan_method
    )

  scan_ct = [rnd(b, length, e) for _ in range(branches)]
  scan_f = jax.jit(scan_fn)
  scan_fb = jax.jit(fwd_bwd_of(scan_fn))
  pieces["scan of 1 layer, fwd"] = lambda: scan_f(streams)
  pieces["scan of 1 layer, fwd+bwd"] = lambda: scan_fb(streams, scan_ct)
  if branches == 2:  # the forward direction alone: what the reversed branch adds
    pieces["scan of 1 layer, forward direction only, fwd+bwd"] = lambda: scan_fb(
        streams[:1], scan_ct[:1]
    )

  # The projections of one layer as plain matmuls.
  mats = {
      "in_proj": (rnd(m, d), rnd(d, 2 * e)),
      "out_proj": (rnd(m, e), rnd(e, d)),
      **{f"x_proj{i}": (rnd(m, e), rnd(e, r + 2 * n)) for i in range(branches)},
      **{f"dt_proj{i}": (rnd(m, r), rnd(r, e)) for i in range(branches)},
  }

  def proj_plain(mats):
    return [mats[k][0] @ mats[k][1] for k in sorted(mats)]  # pytree order: sorted keys

  proj_ct = [rnd(mats[k][0].shape[0], mats[k][1].shape[1]) for k in sorted(mats)]
  proj_f = jax.jit(proj_plain)
  proj_fb = jax.jit(fwd_bwd_of(proj_plain))
  pieces["projections of 1 layer, fwd"] = lambda: proj_f(mats)
  pieces["projections of 1 layer, fwd+bwd"] = lambda: proj_fb(mats, proj_ct)

  # As the mixer builds it: the SiLU included, the gradient native where the scan is.
  on_native = resolve_method(cfg.scan_method) is ScanMethod.NATIVE
  conv = layers.CausalDepthwiseConv1d(kconv, silu=True, native=on_native)
  xc = [rnd(b, length, e) for _ in range(branches)]
  conv_params = [conv.init(jax.random.key(i), xc[0]) for i in range(branches)]

  def conv_fn(args):
    cp, xs = args
    return [conv.apply(p, x) for p, x in zip(cp, xs)]

  conv_ct = [rnd(b, length, e) for _ in range(branches)]
  conv_f = jax.jit(conv_fn)
  conv_fb = jax.jit(fwd_bwd_of(conv_fn))
  pieces["depthwise convs + SiLU of 1 layer, fwd"] = lambda: conv_f((conv_params, xc))
  pieces["depthwise convs + SiLU of 1 layer, fwd+bwd"] = lambda: conv_fb((conv_params, xc), conv_ct)

  norm = layers.RMSNorm()
  xn = rnd(b, length, d)
  norm_params = norm.init(jax.random.key(0), xn)

  def norm_fn(args):
    return norm.apply(*args)

  norm_ct = rnd(b, length, d)
  norm_f = jax.jit(norm_fn)
  norm_fb = jax.jit(fwd_bwd_of(norm_fn))
  pieces["RMSNorm, fwd"] = lambda: norm_f((norm_params, xn))
  pieces["RMSNorm, fwd+bwd"] = lambda: norm_fb((norm_params, xn), norm_ct)

  # Analytic FLOPs (forward, whole batch) and XLA's bytes.
  mix = flops_lib.mixer_flops(cfg)
  fwd_flops = b * flops_lib.model_flops(cfg)["total"]
  scan_flops = b * mix["scan"]
  proj_flops = 2 * m * (d * 2 * e + e * d + branches * (e * (r + 2 * n) + r * e))
  conv_flops = b * mix["conv1d"]
  norm_flops = b * length * d * flops_lib._RMSNORM
  n_opt = sum(v.size for v in jax.tree.leaves(params))
  facts = {
      "config": {
          k: getattr(cfg, k)
          for k in ("d_model", "n_layers", "d_state", "patch_size", "bidirectional", "scan_method")
      },
      "num_tokens": length,
      "d_inner": e,
      "params": n_opt,
      "flops": {
          "train step, 1 device(s) (pmap)": 3 * fwd_flops,
          "train step, 2 device(s) (pmap)": 3 * fwd_flops,
          "forward (loss), 1 device": fwd_flops,
          "forward+backward, 1 device": 3 * fwd_flops,
          "scan of 1 layer, fwd": scan_flops,
          "scan of 1 layer, fwd+bwd": 3 * scan_flops,
          "scan of 1 layer, forward direction only, fwd+bwd": 3 * scan_flops // branches,
          "projections of 1 layer, fwd": proj_flops,
          "projections of 1 layer, fwd+bwd": 3 * proj_flops,
          "depthwise convs + SiLU of 1 layer, fwd": conv_flops,
          "depthwise convs + SiLU of 1 layer, fwd+bwd": 3 * conv_flops,
          "RMSNorm, fwd": norm_flops,
          "RMSNorm, fwd+bwd": 3 * norm_flops,
      },
      "bytes": {
          "forward (loss), 1 device": bytes_accessed(loss_fn, params),
          "forward+backward, 1 device": bytes_accessed(jax.value_and_grad(loss_fn), params),
          "optimizer update (clip+adamw)": bytes_accessed(
              opt_update, grads, state.opt_state, params
          ),
          "scan of 1 layer, fwd": bytes_accessed(scan_fn, streams),
          "scan of 1 layer, fwd+bwd": bytes_accessed(fwd_bwd_of(scan_fn), streams, scan_ct),
          "projections of 1 layer, fwd": bytes_accessed(proj_plain, mats),
          "projections of 1 layer, fwd+bwd": bytes_accessed(fwd_bwd_of(proj_plain), mats, proj_ct),
          "depthwise convs + SiLU of 1 layer, fwd": bytes_accessed(conv_fn, (conv_params, xc)),
          "depthwise convs + SiLU of 1 layer, fwd+bwd": bytes_accessed(
              fwd_bwd_of(conv_fn), (conv_params, xc), conv_ct
          ),
          "RMSNorm, fwd": bytes_accessed(norm_fn, (norm_params, xn)),
          "RMSNorm, fwd+bwd": bytes_accessed(fwd_bwd_of(norm_fn), (norm_params, xn), norm_ct),
      },
  }
  return pieces, facts


def host_pieces() -> dict:
  """Host batch preparation (one epoch of shift-augmented batches, per batch) and dispatch."""
  from mamba_pkd import data as data_lib

  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3600, 28, 28, 1), dtype=np.uint8)
  ds = data_lib.Dataset(
      name="random",
      x_train=x,
      y_train=rng.integers(0, 10, 3600).astype(np.int32),
      x_test=x[:10],
      y_test=np.zeros(10, np.int32),
      num_classes=10,
      mean=np.array([0.5], np.float32),
      std=np.array([0.25], np.float32),
  )
  per_epoch = 3600 // BATCH
  counter = [0]

  def epoch():
    counter[0] += 1
    for _ in data_lib.train_batches(
        ds, batch_size=BATCH, seed=0, epoch=counter[0], augment="shift"
    ):
      pass
    return jnp.zeros(())

  host_batch = np.zeros((BATCH, 28, 28, 1), np.float32)
  trivial = jax.jit(lambda v: v + 1)
  one = jnp.zeros((), jnp.float32)
  return {
      f"host: one epoch of shift-augmented batches ({per_epoch} batches)": epoch,
      "host: device_put of one image batch": lambda: jax.device_put(host_batch),
      "dispatch: trivial jitted call (x + 1 on a scalar)": lambda: trivial(one),
  }, per_epoch


def single_core_roofline(rounds: int) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
  out = subprocess.run(
      ["taskset", "-c", "0", sys.executable, __file__, "--_single_core", "--rounds", str(rounds)],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Markdown tables from the JSON (docs/performance.md quotes them).
# ----------------------------------------------------------------------------


def per_step_count(piece: str, facts: dict) -> int:
  """How many times a training step runs the piece (per-layer parts x n_layers)."""
  layers_ = facts["config"]["n_layers"]
  if "of 1 layer" in piece:
    return layers_
  if piece.startswith("RMSNorm"):
    return layers_ + 1  # one per block + the final norm
  return 1


def render(results: dict) -> str:
  lines = []
  peak = {}
  lines.append(
      "| roofline piece | cores | median ms | min ms | GFLOP/s (median) | GB/s (median) | load |"
  )
  lines.append("|---|---|---:|---:|---:|---:|---|")
  for key, cores in (
      ("roofline_2core", "2"),
      ("roofline_1core", "1 (taskset -c 0, eigen 1 thread)"),
  ):
    for piece, t in results[key].items():
      gflops = t.get("flops", 0) / t["ms"] / 1e6
      gbs = t.get("bytes", 0) / t["ms"] / 1e6
      peak[(key, piece)] = (gflops, gbs)
      lines.append(
          f"| {piece} | {cores} | {t['ms']:.2f} | {t['min_ms']:.2f} | {gflops:.1f} | "
          f"{gbs:.1f} | {t['load'][0]:.2f} |"
      )
  peak_flops = peak[("roofline_2core", "matmul 1024^3")][0]
  peak_bw = peak[("roofline_2core", "add 64Mi f32 (256 MiB, in place)")][1]
  for name in ("teacher", "student_s5"):
    facts = results[name]
    timings = facts["timings"]
    lines += [
        "",
        f"**{name}** ({facts['config']}, {facts['num_tokens']} tokens, d_inner "
        f"{facts['d_inner']}, {facts['params']:,} parameters, batch {BATCH})",
        "",
    ]
    lines.append(
        "| piece | median ms | min ms | x per step | ms per step | analytic GFLOP | GFLOP/s "
        "| % of matmul peak | XLA GB accessed | GB/s | % of DRAM add | load |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for piece, t in timings.items():
      count = per_step_count(piece, facts)
      flops = facts["flops"].get(piece)
      byts = facts["bytes"].get(piece)
      gf = f"{flops / 1e9:.3f}" if flops else "-"
      gfs = f"{flops / t['ms'] / 1e6:.1f}" if flops else "-"
      pct = f"{100 * flops / t['ms'] / 1e6 / peak_flops:.0f}%" if flops else "-"
      gb = f"{byts / 1e9:.3f}" if byts else "-"
      gbs = f"{byts / t['ms'] / 1e6:.1f}" if byts else "-"
      pbw = f"{100 * byts / t['ms'] / 1e6 / peak_bw:.0f}%" if byts else "-"
      lines.append(
          f"| {piece} | {t['ms']:.2f} | {t['min_ms']:.2f} | {count} | {count * t['ms']:.1f} | {gf} | "
          f"{gfs} | {pct} | {gb} | {gbs} | {pbw} | {t['load'][0]:.2f} |"
      )
    parts = [p for p in timings if p.endswith("fwd+bwd") and "direction only" not in p]
    summed = sum(per_step_count(p, facts) * timings[p]["ms"] for p in parts)
    opt = timings["optimizer update (clip+adamw)"]["ms"]
    whole = timings["forward+backward, 1 device"]["ms"]
    lines += [
        "",
        f"Isolated fwd+bwd parts summed over a step ({', '.join(parts)}): "
        f"{summed:.1f} ms of the {whole:.1f} ms forward+backward (1 device); the rest, "
        f"{whole - summed:.1f} ms, is the elementwise work between them (SiLU, softplus, "
        f"gate, flips, residuals, patch embedding, head, loss) and the cost of running the "
        f"parts inside one program instead of alone; optimizer {opt:.2f} ms.",
    ]
  lines += ["", "| host piece | median ms | min ms | load |", "|---|---:|---:|---|"]
  for piece, t in results["host"].items():
    lines.append(f"| {piece} | {t['ms']:.3f} | {t['min_ms']:.3f} | {t['load'][0]:.2f} |")
  lines += [
      "",
      f"Run: {results['wall_s']:.0f} s, {results['rounds']} interleaved rounds per group, "
      f"JAX {results['jax']}, {results['cpus']} CPUs, load (1/5/15 min) at start "
      f"{', '.join(f'{v:.2f}' for v in results['load_start'])}, at end "
      f"{', '.join(f'{v:.2f}' for v in results['load_end'])}.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per group")
  p.add_argument("--json", default=None, help="write the results to this JSON file")
  p.add_argument("--markdown", default=None, help="write the tables to this Markdown file")
  p.add_argument("--render", default=None, help="only render --markdown from this JSON file")
  p.add_argument("--_single_core", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._single_core:
    print(json.dumps(roofline(args.rounds)))
    return

  if args.render:
    with open(args.render) as f:
      text = render(json.load(f))
    if args.markdown:
      with open(args.markdown, "w") as f:
        f.write(text)
    print(text)
    return

  from configs import default
  from mamba_pkd import losses, models, train
  from mamba_pkd.ladders import LADDERS

  start = time.perf_counter()
  config = default.get_config()
  results = {
      "load_start": os.getloadavg(),
      "rounds": args.rounds,
      "jax": jax.__version__,
      "devices": str(jax.devices()),
      "cpus": os.cpu_count(),
  }
  print(f"load {load()}; devices {jax.devices()}", flush=True)
  results["roofline_2core"] = roofline(args.rounds)
  print("roofline (2 cores)", json.dumps(results["roofline_2core"]), flush=True)
  results["roofline_1core"] = single_core_roofline(args.rounds)
  print("roofline (1 core)", json.dumps(results["roofline_1core"]), flush=True)

  def optim_of(section):
    return train.OptimConfig(
        learning_rate=section.learning_rate,
        weight_decay=section.weight_decay,
        warmup_fraction=section.warmup_fraction,
        batch_size=section.batch_size,
        grad_clip=section.grad_clip,
    )

  mnist = LADDERS["mnist"]
  t_shape = mnist["sizes"]["teacher"]
  teacher = models.ModelConfig(
      d_model=t_shape[0],
      n_layers=t_shape[1],
      d_state=t_shape[2],
      patch_size=mnist["patch_size"],
      bidirectional=config.model.bidirectional,
      scan_method=config.model.scan_method,
  )
  s_shape = mnist["sizes"]["s5"]
  student = models.ModelConfig(
      d_model=s_shape[0],
      n_layers=s_shape[1],
      d_state=s_shape[2],
      patch_size=s_shape[3],
      bidirectional=config.model.bidirectional,
      scan_method=config.model.scan_method,
  )
  kd = losses.kd(config.pkd.alpha, config.pkd.temperature, view="student", target="teacher")
  for name, cfg, optim, loss, cached in (
      ("teacher", teacher, optim_of(config.teacher), losses.hard(), False),
      ("student_s5", student, optim_of(config.student), kd, True),
  ):
    pieces, facts = model_pieces(name, cfg, optim, loss, cached)
    facts["timings"] = time_group(pieces, args.rounds)
    results[name] = facts
    print(name, json.dumps(facts, default=str), flush=True)

  pieces, per_epoch = host_pieces()
  results["host"] = time_group(pieces, args.rounds)
  results["host_batches_per_epoch"] = per_epoch
  print("host", json.dumps(results["host"]), flush=True)
  results["load_end"] = os.getloadavg()
  results["wall_s"] = time.perf_counter() - start
  print(f"done in {results['wall_s']:.0f} s, load {load()}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1, default=str)
  text = render(json.loads(json.dumps(results, default=str)))
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main()
