r"""Probe a finished run's early-exit cascade beside every single model and prefix.

  python experiments/cascade_probe.py --workdir=runs/default
  python experiments/cascade_probe.py --workdir=runs/default --budgets=1,1.5,2,3,5,10 \
      --teacher=off,on,auto --bootstrap=200

Reads the run's manifest, config and checkpoints, reloads its dataset and
held-out split (the same seed permutation as the run), predicts the held-out
and test images with every model, then refits the per-prefix combination and
the exit rules on held-out data with the run's own code
(:func:`mamba_pkd.anytime.fit_anytime`, so it also works on runs made before the
combination existed) and prints, for each single model, each prefix (plain sum
and refitted) and each cascade budget: held-out and test accuracy and (mean)
FLOPs as % of the teacher, the cascade's test exit histogram and the bootstrap
spread of its threshold and test accuracy. Each ``--teacher`` choice is
printed (off: students only; on: teacher always the last exit; auto: held-out
picks per budget).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

import ml_collections
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from mamba_pkd import anytime, combine, evaluate, flops, manifest, runs  # noqa: E402
from mamba_pkd import data as data_lib  # noqa: E402


def _model(name, size, config, params, held, test):
  return types.SimpleNamespace(
      name=name, size=size, config=config, params=params, train_logits=held, test_logits=test
  )


def load(workdir: pathlib.Path, batch_size: int, *, with_test: bool = True):
  """(config, dataset, val labels, teacher, students, baselines) with held-out/test logits
  (``with_test=False``: the test images are never predicted; test logits are None)."""
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  m = manifest.read_manifest(workdir)
  ds = data_lib.load_dataset(config.dataset, data_dir=config.data_dir or None, seed=config.seed)
  order = np.random.default_rng(config.seed).permutation(ds.num_train)
  val_index = np.sort(order[: config.validation_size])
  x_val, y_val = ds.x_train[val_index], ds.y_train[val_index]
  kw = dict(mean=ds.mean, std=ds.std, batch_size=batch_size)
  run = runs.load_run(workdir, with_teacher=True)

  def predict(member, prev=None):
    connect = member.config.connect_dim and prev is not None
    held, held_f = evaluate.predict_dataset(
        member.config, member.params, x_val, prev_features=prev[0] if connect else None, **kw
    )
    test, test_f = None, None
    if with_test:
      test, test_f = evaluate.predict_dataset(
          member.config, member.params, ds.x_test, prev_features=prev[1] if connect else None, **kw
      )
    return (held, test), (held_f, test_f)

  (t_held, t_test), _ = predict(run.teacher)
  teacher = _model("teacher", "teacher", run.teacher.config, None, t_held, t_test)
  teacher.prefix_scale = 1.0
  students, prev = [], None
  for s, entry in zip(run.students, m.students):
    (held, test), prev = predict(s, prev)
    model = _model(s.name, s.size, s.config, None, held, test)
    model.prefix_scale = entry.prefix_scale
    students.append(model)
  baselines = []
  for b in m.baselines:
    loaded = runs._loaded(workdir, b, True)  # pylint: disable=protected-access
    (held, test), _ = predict(loaded)
    baselines.append(_model(b.name, b.size, loaded.config, None, held, test))
  return config, ds, y_val, teacher, students, baselines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--budgets", default="1.5,2,3,5,10", help="percent of the teacher's FLOPs")
  parser.add_argument("--teacher", default="off,on,auto", help="teacher-exit choices to compare")
  parser.add_argument("--bootstrap", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=500)
  args = parser.parse_args(argv)
  t0 = time.time()
  workdir = pathlib.Path(args.workdir).absolute()
  config, ds, y_val, teacher, students, baselines = load(workdir, args.batch_size)
  n_val = len(y_val)
  tf = flops.count_flops(teacher.config)
  pct = lambda models: 100.0 * sum(flops.count_flops(x.config) for x in models) / tf  # noqa
  acc = lambda logits, y: 100.0 * float(np.mean(np.argmax(logits, -1) == y))  # noqa
  print(
      f"run {workdir}: {n_val} held-out, {ds.num_test} test images; loaded in {time.time() - t0:.0f}s"
  )
  print(f"{'model':<22} {'% FLOPs':>8} {'held-out %':>10} {'test %':>7}")
  for model in [teacher, *students, *baselines]:
    if model.config.connect_dim:
      continue
    print(
        f"{model.name + ' (' + model.size + ')':<22} {pct([model]):8.2f} "
        f"{acc(model.train_logits, y_val):10.2f} {acc(model.test_logits, ds.y_test):7.2f}"
    )
  held_sum = np.cumsum([s.train_logits for s in students], axis=0)
  test_sum = np.cumsum([s.test_logits for s in students], axis=0)
  for k in range(1, len(students) + 1):
    print(
        f"{'prefix_1..' + str(k):<22} {pct(students[:k]):8.2f} "
        f"{acc(held_sum[k - 1], y_val):10.2f} {acc(test_sum[k - 1], ds.y_test):7.2f}"
    )
  for choice in args.teacher.split(","):
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.report.cascade_budgets_pct = tuple(float(b) for b in args.budgets.split(","))
    cfg.report.cascade_teacher = choice
    cfg.report.cascade_bootstrap = args.bootstrap
    ctx = types.SimpleNamespace(
        config=cfg,
        val_index=np.arange(n_val),
        val_labels=y_val,
        dataset=types.SimpleNamespace(y_test=ds.y_test, num_test=ds.num_test),
    )
    t1 = time.time()
    comb = anytime.fit_anytime(ctx, teacher, students)
    rows, meta = anytime.cascade_report(ctx, comb, teacher, students)
    print(f"\n--teacher={choice} (fit and thresholds in {time.time() - t1:.0f}s)")
    if choice == args.teacher.split(",")[0]:
      print(f"{'prefix (refit)':<22} {'held-out %':>10} {'test %':>7}  NLL / ECE before -> after")
      for k, p in enumerate(meta["prefixes"], start=1):
        h, t = p["heldout"], p["test"]
        print(
            f"{'G_' + str(k) + ' [' + p['source'] + ']':<22} {100 * h['accuracy_after']:10.2f} "
            f"{100 * t['accuracy_after']:7.2f}  held-out {h['nll_before']:.4f}/"
            f"{h['ece_before']:.4f} -> {h['nll_after']:.4f}/{h['ece_after']:.4f}; test "
            f"{t['nll_before']:.4f}/"
            f"{t['ece_before']:.4f} -> {t['nll_after']:.4f}/{t['ece_after']:.4f}"
        )
      print(f"teacher temperature {comb.teacher_temperature:.4g}")
    print(
        f"{'cascade':<14} {'held %FLOPs':>11} {'held-out %':>10} {'test %FLOPs':>11} "
        f"{'test %':>7}  exits (test)   bootstrap p5/p50/p95: threshold | test acc"
    )
    for label, b in meta["budgets"].items():
      if not b["feasible"]:
        print(f"{'@' + label:<14} infeasible on held-out")
        continue
      boot = b.get("bootstrap", {})
      spread = ""
      if boot.get("threshold_p5_p50_p95"):
        th = "/".join(f"{v:.3f}" for v in boot["threshold_p5_p50_p95"])
        ta = "/".join(f"{100 * v:.1f}" for v in boot["test_accuracy_p5_p50_p95"])
        spread = f"{th} | {ta} (teacher in {100 * boot['teacher_exit_fraction']:.0f}%)"
      print(
          f"{'@' + label + (' +T' if b['teacher_exit'] else ''):<14} "
          f"{b['heldout_pct_teacher_flops']:11.2f} {100 * b['heldout_accuracy']:10.2f} "
          f"{b['test_pct_teacher_flops']:11.2f} {100 * b['test_accuracy']:7.2f}  "
          f"{b['test_exits']}  {spread}"
      )
  print(f"\ntotal {time.time() - t0:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
