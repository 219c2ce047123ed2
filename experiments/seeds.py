r"""Comparisons that survive noise: the default job over seeds, with paired tests (issue 12).

Each seed is one run of ``mamba_pkd.main`` (``--config.seed=S``; on ``mnist5k`` the seed also
draws the 4,000 / 1,000 split, so every seed has its own 1,000 test digits). The summary gives,
for every row present in all seeds, the mean +- sample std of its test accuracy and of its %
of the teacher's FLOPs, and the exact McNemar test (``mamba_pkd.paired``: discordant test
digits pooled over seeds, and each seed's own p) of:

* ``cascade``: each ``cascade@b%`` against each single model (teacher, student_k,
  baseline_k, and cnn_k / mlp_k when the runs have them) whose mean FLOPs are at least the
  cascade's mean FLOPs per digit;
* ``kd_vs_ce``: student_k (distilled) against baseline_k (the same size trained with
  cross-entropy on the same views and steps), per size;
* ``prefix_vs_best``: prefix_1..k (k >= 2) against its best member, the student_j (j <= k)
  with the highest mean held-out accuracy over seeds (``results.json``'s
  ``meta.heldout_accuracy``; runs written before it existed: the highest mean test
  accuracy, and the summary says so).

The cascade's per-digit predictions are read from ``predictions.npz`` when the run stored
them; for older runs they are recomputed from the workdir (its manifest's rules and
checkpoints, the run's own test split), checked against the ``results.json`` row.

  # S runs of the default job (~13 min each on 2 CPU cores); finished seeds are skipped
  python experiments/seeds.py run --seeds=0,1,2 --root=runs/seeds
  # summarise finished runs (any seed_<s> workdirs with results.json and predictions.npz)
  python experiments/seeds.py summarize --root=runs/seeds --out=docs/results/seeds/seeds.json
  # print the tables of a summary (what experiments/render_readme.py puts in the README)
  python experiments/seeds.py table --summary=docs/results/seeds/seeds.json
  # the smoke check: 2 seeds of configs/smoke.py (seconds each)
  python experiments/seeds.py run --config=configs/smoke.py --seeds=0,1 --root=/tmp/seeds

Extra flags after ``--`` go to every run (e.g. ``-- --config.report.latency=False``).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import families  # pylint: disable=g-import-not-at-top,wrong-import-position
from mamba_pkd import paired, report  # pylint: disable=g-import-not-at-top,wrong-import-position

FORMAT = "mamba_pkd.seeds_summary"
SINGLE_KINDS = ("teacher", "student", "baseline", "family", "direct")
ALPHA = 0.05
GROUPS = {
    "cascade": "cascade vs single models of at least its mean FLOPs",
    "kd_vs_ce": "distillation (student_k) vs cross-entropy (baseline_k), same size",
    "prefix_vs_best": "prefix vs its best member",
}


def run_command(config: str, workdir: pathlib.Path, seed: int, extra=()) -> list[str]:
  """The ``main`` command of one seed."""
  return [
      sys.executable,
      "-m",
      "mamba_pkd.main",
      f"--config={config}",
      f"--workdir={workdir}",
      f"--config.seed={seed}",
      *extra,
  ]


def recompute_cascade_predictions(workdir: pathlib.Path, labels: np.ndarray) -> dict:
  """``{cascade@b%: predicted class [N]}`` of a run that did not store them.

  The run's members (checkpoints, weights folded) and teacher on the run's own test split,
  then its manifest's combination and rules through ``mamba_pkd.cascade`` as
  ``anytime.cascade_report`` evaluates them.
  """
  from mamba_pkd import anytime, cascade, data, runs  # pylint: disable=g-import-not-at-top

  config = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
  ds = data.load_dataset(
      config["dataset"], data_dir=config.get("data_dir") or None, seed=config["seed"]
  )
  if not np.array_equal(ds.y_test, labels):
    raise ValueError(f"{workdir}: the test labels of its dataset differ from predictions.npz")
  run = runs.load_run(workdir, with_teacher=True)
  models = runs.ensemble_from_run(run)
  x = run.preprocessing.normalize(ds.x_test)
  member_logits, prev = [], None
  for j, member in enumerate(models.members):
    logits, prev = models.member_forward(j, x, prev if member.connect_dim else None)
    member_logits.append(np.asarray(logits, np.float64))
  stage_flops = [m.flops for m in models.members] + [run.teacher_flops]
  plain, with_teacher = anytime.cascade_stages(
      run.combination, models.teacher_fn(x), member_logits, stage_flops
  )
  out = {}
  for label, rule in run.combination.cascades.items():
    if rule is None:
      continue
    rule = cascade.CascadeRule.from_json(rule)
    stages = with_teacher if rule.teacher_exit else plain
    out[f"cascade@{label}"] = stages.outcome(rule.threshold, labels)["prediction"]
  return out


def read_seed(workdir: pathlib.Path) -> dict:
  """One seed's rows, meta, labels and predictions (cascade rows included, see above)."""
  workdir = pathlib.Path(workdir)
  rows, meta = report.read_results(workdir / report.RESULTS_JSON)
  labels, predictions = report.read_predictions(workdir / report.PREDICTIONS_NPZ)
  cascades = [r for r in rows if r.kind == "cascade"]
  source = "stored"
  if any(r.name not in predictions for r in cascades):
    source = "recomputed"
    predictions.update(recompute_cascade_predictions(workdir, labels))
    for r in cascades:
      acc = float(np.mean(predictions[r.name] == labels))
      if abs(acc - r.accuracy) > 1e-9:
        raise ValueError(
            f"{workdir}: recomputed {r.name} has test accuracy {acc}, results.json {r.accuracy}"
        )
  seed = meta.get("seed")
  if seed is None and workdir.name.split("_")[-1].isdigit():  # seed_<s>
    seed = int(workdir.name.split("_")[-1])
  return {
      "seed": seed,
      "rows": rows,
      "meta": meta,
      "labels": labels,
      "predictions": predictions,
      "cascade_predictions": source if cascades else "none",
  }


def _spread(values) -> dict:
  return {
      "mean": statistics.fmean(values),
      "std": statistics.stdev(values) if len(values) > 1 else 0.0,
      "values": list(values),
  }


def summarize_rows(runs: list[dict]) -> list[dict]:
  """Every row present in all seeds (the first seed's order): accuracy and % FLOPs spreads."""
  rows = []
  for first in runs[0]["rows"]:
    same = [next((r for r in run["rows"] if r.name == first.name), None) for run in runs]
    if any(r is None for r in same):
      continue
    rows.append(
        {
            "name": first.name,
            "kind": first.kind,
            "size": first.size,
            "accuracy": _spread([r.accuracy for r in same]),
            "pct_teacher_flops": _spread([r.pct_teacher_flops for r in same]),
            "flops_mean": statistics.fmean(r.flops for r in same),
        }
    )
  return rows


def paired_test(runs: list[dict], group: str, a: str, b: str) -> dict:
  """McNemar of row ``a`` against row ``b``: pooled over seeds, and per seed."""
  labels = [run["labels"] for run in runs]
  pred_a = [run["predictions"][a] for run in runs]
  pred_b = [run["predictions"][b] for run in runs]
  pooled = paired.mcnemar_exact(labels, pred_a, pred_b)
  per_seed = [paired.mcnemar_exact(y, pa, pb) for y, pa, pb in zip(labels, pred_a, pred_b)]
  diff = [float(np.mean(pa == y) - np.mean(pb == y)) for y, pa, pb in zip(labels, pred_a, pred_b)]
  return {
      "group": group,
      "a": a,
      "b": b,
      "a_only_right": pooled.b,
      "b_only_right": pooled.c,
      "p_value": pooled.p_value,
      "p_value_per_seed": [t.p_value for t in per_seed],
      "accuracy_diff_mean": statistics.fmean(diff),
      "significant": pooled.p_value < ALPHA,
  }


def holm(p_values) -> list[float]:
  """Holm's step-down adjustment of ``p_values`` (one family of tests), in their order:
  the i-th smallest becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))`` (j from 1)."""
  order = sorted(range(len(p_values)), key=lambda i: p_values[i])
  out, running = [0.0] * len(p_values), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
    out[i] = running
  return out


def best_members(runs: list[dict], rows: list[dict]) -> tuple[str, dict[str, float]]:
  """(``"heldout"`` or ``"test"``, mean accuracy of each student over seeds on that split)."""
  students = [r["name"] for r in rows if r["kind"] == "student"]
  held = [run["meta"].get("heldout_accuracy") or {} for run in runs]
  if students and all(all(s in h for s in students) for h in held):
    return "heldout", {s: statistics.fmean(h[s] for h in held) for s in students}
  by_name = {r["name"]: r for r in rows}
  return "test", {s: by_name[s]["accuracy"]["mean"] for s in students}


def pairs(runs: list[dict], rows: list[dict]) -> tuple[list[tuple[str, str, str]], str]:
  """The (group, a, b) comparisons of the module docstring, and the best member's basis."""
  have = [r for r in rows if all(r["name"] in run["predictions"] for run in runs)]
  names = {r["name"] for r in have}
  out = []
  singles = [r for r in have if r["kind"] in SINGLE_KINDS]
  for c in (r for r in have if r["kind"] == "cascade"):
    for s in singles:
      if s["flops_mean"] >= c["flops_mean"]:
        out.append(("cascade", c["name"], s["name"]))
  for r in have:
    if r["kind"] == "student" and "baseline_" + r["name"].split("_")[1] in names:
      out.append(("kd_vs_ce", r["name"], "baseline_" + r["name"].split("_")[1]))
  basis, score = best_members(runs, rows)
  for r in have:
    if r["kind"] != "prefix":
      continue
    k = int(r["name"].split("..")[1])
    members = [f"student_{j}" for j in range(1, k + 1) if f"student_{j}" in score]
    if k >= 2 and members and all(m in names for m in members):
      best = max(members, key=lambda m: (score[m], -int(m.split("_")[1])))
      out.append(("prefix_vs_best", r["name"], best))
  return out, basis


def summarize(workdirs) -> dict:
  """The summary (JSON-able) of finished runs, one per seed."""
  runs = [read_seed(w) for w in workdirs]
  if not runs:
    raise ValueError("no finished runs (results.json and predictions.npz) to summarise")
  rows = summarize_rows(runs)
  comparisons, basis = pairs(runs, rows)
  return {
      "format": FORMAT,
      "version": 1,
      "seeds": [run["seed"] for run in runs],
      "dataset": runs[0]["meta"].get("dataset"),
      "num_test": [int(len(run["labels"])) for run in runs],
      "cascade_predictions": [run["cascade_predictions"] for run in runs],
      "best_member_by": basis,
      "alpha": ALPHA,
      "rows": rows,
      "tests": with_holm([paired_test(runs, *p) for p in comparisons]),
  }


def with_holm(tests: list[dict]) -> list[dict]:
  """``tests`` with ``p_holm``: Holm's adjustment within each comparison group."""
  for group in GROUPS:
    members = [t for t in tests if t["group"] == group]
    for t, p in zip(members, holm([t["p_value"] for t in members])):
      t["p_holm"] = p
  return tests


def _pm(spread: dict, scale: float, digits: int = 2) -> str:
  std = f" +- {scale * spread['std']:.{digits}f}" if len(spread["values"]) > 1 else ""
  return f"{scale * spread['mean']:.{digits}f}{std}"


def format_table(summary: dict) -> str:
  """Markdown: the rows' spreads, then the paired tests grouped as in the module docstring."""
  n = len(summary["seeds"])
  seeds = f"{n} seed{'s' * (n != 1)}: {', '.join(str(s) for s in summary['seeds'])}"
  lines = [
      f"| row | size | accuracy % (mean +- std, {seeds}) | % teacher FLOPs (mean +- std) |",
      "|---|---|---:|---:|",
  ]
  for r in summary["rows"]:
    lines.append(
        f"| {r['name']} | {r['size']} | {_pm(r['accuracy'], 100)} | "
        f"{_pm(r['pct_teacher_flops'], 1)} |"
    )
  basis = {
      "heldout": "held-out accuracy",
      "test": "test accuracy (these runs stored no held-out accuracy per student)",
  }
  lines += [
      "",
      f"Paired tests: exact McNemar on the test digits, discordant digits pooled over the "
      f"{n} seeds (p per seed in brackets; the last column: Holm's step-down correction "
      f"within each kind of comparison); A - B is the mean accuracy difference in points; "
      f"a prefix's best member is its student of highest mean {basis[summary['best_member_by']]}.",
      "",
      "| comparison | A | B | A - B (points) | only A right / only B right | McNemar p | "
      f"p < {summary['alpha']:g} | Holm p (within the comparison) |",
      "|---|---|---|---:|---:|---|---|---:|",
  ]
  for t in summary["tests"]:
    per = ", ".join(f"{p:.2g}" for p in t["p_value_per_seed"])
    lines.append(
        f"| {t['group']} | {t['a']} | {t['b']} | {100 * t['accuracy_diff_mean']:+.2f} | "
        f"{t['a_only_right']} / {t['b_only_right']} | {t['p_value']:.3g} ({per}) | "
        f"{'yes' if t['significant'] else 'no'} | {t['p_holm']:.3g} |"
    )
  return "\n".join(lines) + "\n" + format_conclusions(summary)


def format_conclusions(summary: dict) -> str:
  """One line per comparison group: which differences are significant, which are not."""
  out = []
  for group, title in GROUPS.items():
    tests = [t for t in summary["tests"] if t["group"] == group]
    if not tests:
      continue
    name = lambda t: f"{t['a']} vs {t['b']} ({100 * t['accuracy_diff_mean']:+.2f}, p = {t['p_value']:.2g})"  # noqa
    better = [name(t) for t in tests if t["significant"] and t["accuracy_diff_mean"] > 0]
    worse = [name(t) for t in tests if t["significant"] and t["accuracy_diff_mean"] <= 0]
    same = [t for t in tests if not t["significant"]]
    out.append(
        f"* {title}: A significantly better in {len(better)} of {len(tests)}"
        + (f" ({'; '.join(better)})" if better else "")
        + f"; A significantly worse in {len(worse)}"
        + (f" ({'; '.join(worse)})" if worse else "")
        + f"; not significant in {len(same)}; "
        + f"{sum(t['p_holm'] < summary['alpha'] for t in tests)} stay below "
        + f"{summary['alpha']:g} after Holm's correction for the {len(tests)} tests."
    )
  return ("\n" + "\n".join(out) + "\n") if out else ""


def main(argv=None) -> int:
  return families.seeds_cli(
      argv,
      doc=__doc__,
      name="seeds",
      run_command=run_command,
      summarize_fn=summarize,
      format_table_fn=format_table,
      skip_finished=True,
  )


if __name__ == "__main__":
  sys.exit(main())
