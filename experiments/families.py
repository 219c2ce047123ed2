r"""Is Mamba the right student? Mamba, CNN and MLP students at equal FLOPs, over seeds (issue 16).

Each seed is one run of ``mamba_pkd.main`` with ``report.family_rows=("cnn", "mlp")``: beside
student k (a Mamba rung), a CNN and an MLP at the same analytic FLOPs are distilled from the
same cached teacher outputs on the same views, with the same loss, optimiser, steps and seed
(``mamba_pkd.comparisons``). The summary gives, per rung: accuracy (mean +- sample std over
seeds), FLOPs, params, CPU latency at batch 1 and 256 (mean over seeds' runs), and the exact
McNemar test (``mamba_pkd.paired``) of the Mamba student against the best other family (the
higher mean accuracy), discordant test images pooled over seeds.

  # S runs of the default job (~15 min each on 2 CPU cores), then the summary
  python experiments/families.py run --seeds=0,1,2 --root=runs/families
  # summarise finished runs (any workdirs with results.json and predictions.npz)
  python experiments/families.py summarize --root=runs/families \
      --out=docs/results/families/families.json
  # print the table of a summary (what experiments/render_readme.py puts in the README)
  python experiments/families.py table --summary=docs/results/families/families.json
  # the smoke check: 2 seeds of configs/smoke.py (seconds each)
  python experiments/families.py run --config=configs/smoke.py --seeds=0,1 --root=/tmp/fam

Extra flags after ``--`` go to every run (e.g. ``-- --config.report.latency=False``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from mamba_pkd import paired, report  # pylint: disable=g-import-not-at-top,wrong-import-position
from mamba_pkd.ladders import split_size_name  # pylint: disable=g-import-not-at-top,wrong-import-position

FAMILIES = ("mamba", "cnn", "mlp")
FORMAT = "mamba_pkd.families_summary"


def run_command(config: str, workdir: pathlib.Path, seed: int, extra=()) -> list[str]:
  """The ``main`` command of one seed with the CNN and MLP rows on."""
  return [
      sys.executable,
      "-m",
      "mamba_pkd.main",
      f"--config={config}",
      f"--workdir={workdir}",
      f"--config.seed={seed}",
      '--config.report.family_rows=("cnn","mlp")',
      *extra,
  ]


def run_seeds(
    make_command,
    config: str,
    seeds: str,
    root: pathlib.Path,
    extra=(),
    *,
    skip_finished: bool = False,
) -> int:
  """Runs ``make_command(config, root / f"seed_{s}", s, extra)`` for each of ``seeds``
  (``"0,1,2"``) in turn; returns the first non-zero exit status, else 0. With
  ``skip_finished``, a workdir that has its ``predictions.npz`` (written last) is skipped."""
  for seed in (int(s) for s in seeds.split(",")):
    workdir = pathlib.Path(root) / f"seed_{seed}"
    if skip_finished and (workdir / report.PREDICTIONS_NPZ).is_file():
      print(f"seed {seed}: {workdir} is finished, skipped", flush=True)
      continue
    print(f"seed {seed}: {workdir} (load average {os.getloadavg()})", flush=True)
    done = subprocess.run(make_command(config, workdir, seed, extra), cwd=REPO)
    if done.returncode:
      print(f"error: the run of seed {seed} exited with {done.returncode}", file=sys.stderr)
      return done.returncode
  return 0


def seed_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  """The finished runs under ``root`` (``seed_<s>`` folders with both result files)."""
  return sorted(
      (p for p in pathlib.Path(root).glob("seed_*") if (p / report.PREDICTIONS_NPZ).is_file()),
      key=lambda p: int(p.name.split("_")[1]),
  )


def family_rows_of_run(rows) -> dict[str, dict[str, report.Row]]:
  """``{rung: {family: row}}`` of one run: student k under its own family, ``<family>_k``
  under theirs; the rung is the Mamba size name (``"s3"``)."""
  by_name = {r.name: r for r in rows}
  out: dict[str, dict[str, report.Row]] = {}
  for r in rows:
    if r.kind != "student":
      continue
    k = r.name.split("_")[1]
    family, rung = split_size_name(r.size)
    out.setdefault(rung, {})[family] = r
    for other in FAMILIES:
      if f"{other}_{k}" in by_name:
        out[rung][other] = by_name[f"{other}_{k}"]
  return out


def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def summarize(workdirs) -> dict:
  """The summary (JSON-able) of finished runs, one per seed."""
  per_seed = []
  for w in workdirs:
    rows, meta = report.read_results(pathlib.Path(w) / report.RESULTS_JSON)
    labels, predictions = report.read_predictions(pathlib.Path(w) / report.PREDICTIONS_NPZ)
    per_seed.append((meta, family_rows_of_run(rows), labels, predictions))
  if not per_seed:
    raise ValueError("no finished runs (results.json and predictions.npz) to summarise")
  order = {}  # every rung any seed reached, cheapest first
  for _, by_rung, _, _ in per_seed:
    for rung, by_family in by_rung.items():
      order.setdefault(rung, min(r.flops for r in by_family.values()))
  rungs = []
  for rung in sorted(order, key=order.get):
    runs = [(m, f[rung], y, p) for m, f, y, p in per_seed if rung in f]
    families = {}
    for family in FAMILIES:
      present = [(m, by[family], y, p) for m, by, y, p in runs if family in by]
      if len(present) != len(runs):
        continue
      acc = [r.accuracy for _, r, _, _ in present]
      families[family] = {
          "row_names": [r.name for _, r, _, _ in present],
          "size": present[0][1].size,
          "accuracy": acc,
          "accuracy_mean": statistics.fmean(acc),
          "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
          "flops": present[0][1].flops,
          "params": present[0][1].params,
          "pct_teacher_flops": present[0][1].pct_teacher_flops,
          "latency_ms_b1": _mean([r.latency_ms_b1 for _, r, _, _ in present]),
          "latency_ms_b256": _mean([r.latency_ms_b256 for _, r, _, _ in present]),
      }
    entry = {"rung": rung, "num_seeds": len(runs), "families": families}
    others = [f for f in families if f != "mamba"]
    if "mamba" in families and others:
      best = max(others, key=lambda f: families[f]["accuracy_mean"])
      labels = [y for _, _, y, _ in runs]
      pick = lambda f: [p[by[f].name] for _, by, _, p in runs]  # noqa: E731
      test = paired.mcnemar_exact(labels, pick("mamba"), pick(best))
      per = [
          paired.mcnemar_exact(y, a, b).p_value
          for y, a, b in zip(labels, pick("mamba"), pick(best))
      ]
      entry["mcnemar"] = {
          "a": "mamba",
          "b": best,
          "mamba_only_right": test.b,
          "other_only_right": test.c,
          "p_value": test.p_value,
          "p_value_per_seed": per,
      }
      winner = max(families, key=lambda f: families[f]["accuracy_mean"])
      entry["winner"] = winner
    rungs.append(entry)
  return {
      "format": FORMAT,
      "version": 1,
      "seeds": [m.get("seed") for m, _, _, _ in per_seed],
      "dataset": per_seed[0][0].get("dataset"),
      "num_test": per_seed[0][0].get("num_test"),
      "rungs": rungs,
  }


def _latency(ms) -> str:
  return "-" if ms is None else f"{ms:.4g}"


def format_table(summary: dict) -> str:
  """Markdown: one line per rung and family, the McNemar test on the Mamba line."""
  seeds = summary["seeds"]
  std = lambda f: f" +- {100 * f['accuracy_std']:.2f}" if len(f["accuracy"]) > 1 else ""  # noqa
  lines = [
      f"| rung | family | size | accuracy % (mean +- std, {len(seeds)} seed{'s' * (len(seeds) != 1)}) | FLOPs | "
      "% teacher | params | latency b1 (ms) | latency b256 (ms) | Mamba vs best other: "
      "McNemar p (pooled; only Mamba right / only other right) |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for entry in summary["rungs"]:
    n = entry["num_seeds"]
    seeds_note = "" if n == len(seeds) else f" ({n} seed{'s' * (n > 1)})"
    for family in (f for f in FAMILIES if f in entry["families"]):  # json sorts the keys
      f = entry["families"][family]
      test = ""
      if family == "mamba" and "mcnemar" in entry:
        m = entry["mcnemar"]
        test = (
            f"vs {m['b']}: p = {m['p_value']:.3g} ({m['mamba_only_right']} / "
            f"{m['other_only_right']}; per seed {', '.join(f'{p:.2g}' for p in m['p_value_per_seed'])})"
        )
      lines.append(
          f"| {entry['rung']} | {family} | {f['size']} | {100 * f['accuracy_mean']:.2f}"
          f"{std(f)}{seeds_note} | {report._format_count(f['flops'])} | "  # pylint: disable=protected-access
          f"{f['pct_teacher_flops']:.2f} | {f['params']:,} | {_latency(f['latency_ms_b1'])} | "
          f"{_latency(f['latency_ms_b256'])} | {test} |"
      )
  return "\n".join(lines) + "\n"


def write_summary(summary: dict, path: pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  return path


def seeds_cli(
    argv, *, doc: str, name: str, run_command, summarize_fn, format_table_fn, skip_finished: bool
) -> int:
  """The ``run | summarize | table`` command line shared by this script and seeds.py.

  ``name``: the default root ``runs/<name>`` and summary ``<root>/<name>.json``; extra
  flags after ``--`` go to every run (:func:`run_seeds`).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("command", choices=("run", "summarize", "table"))
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--root", default=f"runs/{name}")
  parser.add_argument("--out", default="", help=f"summary file (default: <root>/{name}.json)")
  parser.add_argument("--summary", default="", help="table: the summary to print")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  out = pathlib.Path(args.out) if args.out else root / f"{name}.json"
  if args.command == "table":
    summary = json.loads(pathlib.Path(args.summary or out).read_text(encoding="utf-8"))
    print(format_table_fn(summary), end="")
    return 0
  if args.command == "run":
    returncode = run_seeds(
        run_command, args.config, args.seeds, root, extra, skip_finished=skip_finished
    )
    if returncode:
      return returncode
  summary = summarize_fn(seed_dirs(root))
  print(f"summary of seeds {summary['seeds']} -> {write_summary(summary, out)}")
  print(format_table_fn(summary), end="")
  return 0


def main(argv=None) -> int:
  return seeds_cli(
      argv,
      doc=__doc__,
      name="families",
      run_command=run_command,
      summarize_fn=summarize,
      format_table_fn=format_table,
      skip_finished=False,
  )


if __name__ == "__main__":
  sys.exit(main())
