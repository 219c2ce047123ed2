r"""Compare finished runs on their held-out digits only, cross-fitted.

  python experiments/heldout_compare.py --workdirs=runs/default,runs/focus05 \
      --budgets=1.5,2,3,5,10 --repeats=50

For choices between run settings (e.g. ``pkd.cascade_focus``) without looking at the
test split: the runs must share their held-out split (same dataset, seed and
``validation_size``; checked). Each repeat splits the held-out digits in two halves at
random (the same halves for every run); the per-prefix combination and each budget's exit
rule are fitted on one half with the run's own code (:func:`mamba_pkd.combine.fit_prefixes`,
:func:`mamba_pkd.cascade.choose_rule`) and scored on the other, then the halves swap, so
every digit gets one out-of-fold prediction per repeat. Printed per run: each prefix's
out-of-fold NLL and accuracy, and each budget's cascade accuracy and mean FLOPs (% of the
teacher's); then each run minus the first, as the mean over digits of the paired
difference in out-of-fold correctness (averaged over repeats) +- its standard error over
the digits. The test split is never predicted.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from mamba_pkd import anytime, cascade, combine, flops  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))
import cascade_probe  # noqa: E402  pylint: disable=g-import-not-at-top


def out_of_fold(teacher, students, labels, budgets, *, repeats: int, seed: int, teacher_mode: str):
  """Per digit, averaged over repeats: prefix NLL and correctness, cascade correctness
  and FLOPs per budget (each from a fit on the other half of the held-out digits)."""
  n, k = len(labels), len(students)
  member = [np.asarray(s.train_logits, np.float64) for s in students]
  teacher_logits = np.asarray(teacher.train_logits, np.float64)
  teacher_flops = flops.count_flops(teacher.config)
  stage_flops = [flops.count_flops(s.config) for s in students] + [teacher_flops]
  nll = np.zeros((k, n))
  prefix_correct = np.zeros((k, n))
  correct = {b: np.zeros(n) for b in budgets}
  cost = {b: np.zeros(n) for b in budgets}
  rng = np.random.default_rng(seed)
  for _ in range(repeats):
    order = rng.permutation(n)
    for fit_rows, score_rows in (
        (order[: n // 2], order[n // 2 :]),
        (order[n // 2 :], order[: n // 2]),
    ):
      y_fit, y_score = labels[fit_rows], labels[score_rows]
      fit_m, score_m = [m[fit_rows] for m in member], [m[score_rows] for m in member]
      fits = combine.fit_prefixes(fit_m, y_fit, [s.prefix_scale for s in students])
      comb = combine.Combination(fits, combine.fit_temperature(teacher_logits[fit_rows], y_fit))
      for j, fit in enumerate(fits):
        g = fit.logits(score_m)
        lp = combine.log_softmax(g)
        nll[j, score_rows] -= lp[np.arange(len(score_rows)), y_score]
        prefix_correct[j, score_rows] += np.argmax(g, -1) == y_score
      fit_stages = anytime.cascade_stages(comb, teacher_logits[fit_rows], fit_m, stage_flops)
      score_stages = anytime.cascade_stages(comb, teacher_logits[score_rows], score_m, stage_flops)
      for b in budgets:
        rule = cascade.choose_rule(
            fit_stages[0],
            y_fit,
            b,
            teacher_flops,
            with_teacher=fit_stages[1],
            teacher=teacher_mode,
        )
        if rule is None:
          correct[b][score_rows] = np.nan
          continue
        stages = score_stages[1] if rule.teacher_exit else score_stages[0]
        exits = stages.exits(rule.threshold)
        pred = stages.prediction[exits, np.arange(len(score_rows))]
        correct[b][score_rows] += pred == y_score
        cost[b][score_rows] += 100.0 * stages.cumulative_flops[exits] / teacher_flops
  scale = 1.0 / repeats
  return {
      "nll": nll * scale,
      "prefix_correct": prefix_correct * scale,
      "correct": {b: v * scale for b, v in correct.items()},
      "cost": {b: v * scale for b, v in cost.items()},
  }


def _loadavg() -> str:
  return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdirs", required=True, help="comma-separated run directories")
  parser.add_argument("--budgets", default="1.5,2,3,5,10", help="percent of the teacher's FLOPs")
  parser.add_argument("--repeats", type=int, default=50, help="random half splits")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--teacher", default="auto", help="teacher as last exit: auto | on | off")
  parser.add_argument("--batch_size", type=int, default=500)
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.teacher not in cascade.TEACHER_CHOICES:
    parser.error(f"--teacher={args.teacher!r}: choose one of {cascade.TEACHER_CHOICES}")
  budgets = [float(b) for b in args.budgets.split(",")]
  t0 = time.time()
  results, labels = {}, None
  for workdir in args.workdirs.split(","):
    path = pathlib.Path(workdir).absolute()
    _, _, y_val, teacher, students, _ = cascade_probe.load(path, args.batch_size, with_test=False)
    if labels is not None and not np.array_equal(labels, y_val):
      raise SystemExit(
          f"{workdir}: its held-out split differs from the first run's; not comparable"
      )
    labels = y_val
    results[workdir] = out_of_fold(
        teacher,
        students,
        y_val,
        budgets,
        repeats=args.repeats,
        seed=args.seed,
        teacher_mode=args.teacher,
    )
  n = len(labels)
  print(
      f"{n} held-out digits, {args.repeats} repeats x 2 halves, --teacher={args.teacher}; "
      f"{time.time() - t0:.0f}s, load {_loadavg()}"
  )
  print("\nout-of-fold per prefix: NLL / accuracy %")
  for workdir, r in results.items():
    cells = "  ".join(
        f"G_{j + 1} {r['nll'][j].mean():.4f}/{100 * r['prefix_correct'][j].mean():.2f}"
        for j in range(len(r["nll"]))
    )
    print(f"{workdir:<24} {cells}")
  print("\nout-of-fold cascade per budget: accuracy % at mean % of the teacher's FLOPs")
  for workdir, r in results.items():
    cells = "  ".join(
        f"@{b:g}% {100 * np.mean(r['correct'][b]):.2f} at {np.mean(r['cost'][b]):.2f}"
        for b in budgets
    )
    print(f"{workdir:<24} {cells}")
  first = next(iter(results))
  print(f"\nminus {first} (points, paired over the {n} digits, +- standard error)")
  for workdir, r in list(results.items())[1:]:
    base = results[first]
    cells = []
    for b in budgets:
      d = 100 * (r["correct"][b] - base["correct"][b])
      cells.append(f"@{b:g}% {d.mean():+.2f}+-{d.std(ddof=1) / np.sqrt(n):.2f}")
    for j in range(min(len(r["nll"]), len(base["nll"]))):
      d = r["nll"][j] - base["nll"][j]
      cells.append(f"NLL G_{j + 1} {d.mean():+.4f}+-{d.std(ddof=1) / np.sqrt(n):.4f}")
    print(f"{workdir:<24} " + "  ".join(cells))
  return 0


if __name__ == "__main__":
  sys.exit(main())
