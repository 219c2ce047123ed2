r"""The paper's two experiments (MNIST, CIFAR-10): launch, compare with the paper, estimate cost.

  # 1. prepare the TFDS data once, on a machine with internet (see configs/mnist.py)
  # 2. run (all local devices; resumable: re-run the same command after an interruption)
  python experiments/reproduce_paper.py run mnist --workdir=runs/mnist \
      --data_dir=$HOME/tensorflow_datasets
  python experiments/reproduce_paper.py run cifar10 --workdir=runs/cifar10 \
      --data_dir=$HOME/tensorflow_datasets
  # 3. our numbers beside the paper's (also works for the offline default run)
  python experiments/reproduce_paper.py compare mnist --workdir=runs/mnist
  python experiments/reproduce_paper.py compare default --workdir=runs/default
  # print the exact commands without running anything
  python experiments/reproduce_paper.py commands
  # cost estimate on this machine: a short run on SYNTHETIC data of the same
  # shape and sizes (never a result), extrapolated to the full config
  python experiments/reproduce_paper.py estimate mnist --out=/tmp/estimate_mnist.json

``run`` is exactly ``python -m mamba_pkd.main --config=configs/<exp>.py
--workdir=... [--config.data_dir=...]`` followed by ``compare``.

``estimate`` trains the config's teacher, its smallest (s1) and largest (s8)
student sizes for ``--epochs`` epochs on a synthetic dataset with the real
image shape and class count, reads the steps/s logged in metrics.jsonl and
the device's peak memory, and extrapolates the full run's wall time as
``teacher_steps / teacher_rate + S * student_steps / student_rate`` with S = 14
student trainings (7 students + 7 baselines, each accepted at the first try)
up to 23 (every rung retried once), the student rate between the s8 and s1
rates, plus the measured compile time per stage. It does not count the data
loading of the TFDS set or the per-stage predictions over the training set
(small next to training at these sizes).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    "mnist": "configs/mnist.py",
    "cifar10": "configs/cifar10.py",
    "default": "configs/default.py",
}
# The paper's abstract (arXiv 2503.01727): percentages of the teacher's FLOPs, accuracies in %.
PAPER = {
    "mnist": {
        "teacher_accuracy": 98.0,
        "weakest_pct_flops": 1.0,
        "weakest_accuracy": 72.0,
        "ensemble_students": 7,
        "ensemble_pct_flops": 63.0,
        "ensemble_accuracy": 98.0,
    },
    "cifar10": {
        "teacher_accuracy": None,
        "weakest_pct_flops": 5.0,
        "weakest_accuracy": 50.0,
        "ensemble_gap_points": 1.0,
    },
}
PAPER["default"] = PAPER["mnist"]  # mnist5k: a 5,000-digit subset of the same task
SYNTHETIC_SHAPES = {
    "mnist": (28, 28, 1, 10),
    "cifar10": (32, 32, 3, 10),
    "default": (28, 28, 1, 10),
}
FULL_TRAIN = {"mnist": 60000, "cifar10": 50000, "default": 4000}


def load_config(experiment: str):
  """The ml_collections config of an experiment, loaded from its file."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  if experiment not in CONFIGS:
    raise ValueError(f"unknown experiment {experiment!r}; choose one of {sorted(CONFIGS)}")
  path = REPO / CONFIGS[experiment]
  spec = importlib.util.spec_from_file_location(f"config_{experiment}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def launch_command(experiment: str, workdir: str, data_dir: str = "") -> list[str]:
  """The exact main command of an experiment."""
  if experiment not in CONFIGS:
    raise ValueError(f"unknown experiment {experiment!r}; choose one of {sorted(CONFIGS)}")
  if not workdir.startswith("$"):
    workdir = str(pathlib.Path(workdir).absolute())  # Orbax refuses relative checkpoint paths
  cmd = [
      sys.executable,
      "-m",
      "mamba_pkd.main",
      f"--config={CONFIGS[experiment]}",
      f"--workdir={workdir}",
  ]
  if data_dir:
    cmd.append(f"--config.data_dir={data_dir}")
  return cmd


def summarize(results_path: str | pathlib.Path) -> dict:
  """Headline numbers of a results.json (accuracies in %, FLOPs in % of the teacher)."""
  data = json.loads(pathlib.Path(results_path).read_text(encoding="utf-8"))
  rows = {r["name"]: r for r in data["rows"]}
  prefixes = sorted(
      (r for r in data["rows"] if r["kind"] == "prefix"), key=lambda r: r["pct_teacher_flops"]
  )
  students = [r for r in data["rows"] if r["kind"] == "student"]
  teacher = rows["teacher"]
  out = {
      "dataset": data["meta"].get("dataset"),
      "teacher_accuracy": 100 * teacher["accuracy"],
      "num_students": len(prefixes) or len(students),
  }
  if students:
    weakest = min(students, key=lambda r: r["pct_teacher_flops"])
    out.update(
        weakest=weakest["name"],
        weakest_pct_flops=weakest["pct_teacher_flops"],
        weakest_accuracy=100 * weakest["accuracy"],
    )
  if prefixes:
    last = prefixes[-1]
    out.update(
        ensemble_pct_flops=last["pct_teacher_flops"],
        ensemble_accuracy=100 * last["accuracy"],
        ensemble_gap_points=100 * (teacher["accuracy"] - last["accuracy"]),
    )
    close = [p for p in prefixes if teacher["accuracy"] - p["accuracy"] <= 0.01]
    if close:
      out.update(
          cheapest_within_1pt=close[0]["name"],
          cheapest_within_1pt_pct_flops=close[0]["pct_teacher_flops"],
      )
  return out


def compare_table(experiment: str, ours: dict) -> str:
  """Markdown: the paper's numbers beside ours."""
  paper = PAPER[experiment]

  def cell(value, fmt="{:.1f}"):
    return "-" if value is None else fmt.format(value)

  lines = [
      "| | paper | ours |",
      "|---|---:|---:|",
      f"| teacher accuracy % | {cell(paper.get('teacher_accuracy'))} | "
      f"{cell(ours.get('teacher_accuracy'), '{:.2f}')} |",
      f"| weakest student: % teacher FLOPs | {cell(paper.get('weakest_pct_flops'))} | "
      f"{cell(ours.get('weakest_pct_flops'), '{:.2f}')} |",
      f"| weakest student: accuracy % | {cell(paper.get('weakest_accuracy'))} | "
      f"{cell(ours.get('weakest_accuracy'), '{:.2f}')} |",
      f"| students in the ensemble | {cell(paper.get('ensemble_students'), '{}')} | "
      f"{ours.get('num_students', '-')} |",
      f"| ensemble: % teacher FLOPs | {cell(paper.get('ensemble_pct_flops'))} | "
      f"{cell(ours.get('ensemble_pct_flops'), '{:.2f}')} |",
      f"| ensemble: accuracy % | {cell(paper.get('ensemble_accuracy'))} | "
      f"{cell(ours.get('ensemble_accuracy'), '{:.2f}')} |",
      f"| ensemble: points under the teacher | {cell(paper.get('ensemble_gap_points'))} | "
      f"{cell(ours.get('ensemble_gap_points'), '{:.2f}')} |",
  ]
  return "\n".join(lines) + "\n"


def estimate(
    experiment: str,
    *,
    epochs: int = 2,
    num_train: int = 20480,
    scan_method: str = "",
    workdir: str = "",
) -> dict:
  """Short synthetic run of the config's teacher, s1 and s8; extrapolates the full run.

  The synthetic data has the experiment's image shape and class count; its
  accuracies mean nothing, only the speeds and memory are used.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mamba_pkd import pkd  # pylint: disable=g-import-not-at-top

  config = load_config(experiment)
  full = load_config(experiment)
  h, w, c, k = SYNTHETIC_SHAPES[experiment]
  config.dataset = (
      f"synthetic:num_train={num_train},num_test=1000,height={h},width={w},"
      f"channels={c},num_classes={k}"
  )
  config.teacher.epochs = epochs
  config.student.epochs = epochs
  config.pkd.ladder = ("s1", "s8")
  config.pkd.max_students = 2
  config.pkd.reseeds = 0
  config.pkd.max_accuracy_drop = 1.0
  config.pkd.margin = -1e9  # accept both, so both sizes are trained and timed
  config.baselines = False
  config.report.latency = False
  config.log_every = 10
  if scan_method:
    config.model.scan_method = scan_method
  workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix=f"estimate_{experiment}_"))
  t0 = time.time()
  pkd.train_and_evaluate(config, workdir)
  wall = time.time() - t0
  rates: dict[str, float] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    rates[record["stage"]] = record["steps_per_sec"]  # cumulative since compile: keep the last
  stats = jax.local_devices()[0].memory_stats() or {}
  teacher_rate = rates["teacher"]
  s1_rate = next(v for s, v in rates.items() if "_s1_" in s)
  s8_rate = next(v for s, v in rates.items() if "_s8_" in s)
  train_rows = num_train - config.validation_size
  short_steps = epochs * (train_rows // config.teacher.batch_size)
  compute_s = short_steps / teacher_rate + 2 * short_steps / ((s1_rate + s8_rate) / 2)
  overhead_per_stage = max(0.0, (wall - compute_s) / 3)  # compile, predictions, checkpoints
  full_rows = FULL_TRAIN[experiment] - full.validation_size
  t_steps = full.teacher.epochs * (full_rows // full.teacher.batch_size)
  s_steps = full.student.epochs * (full_rows // full.student.batch_size)
  teacher_s = t_steps / teacher_rate + overhead_per_stage
  low = teacher_s + 14 * (s_steps / s1_rate + overhead_per_stage)
  high = teacher_s + 23 * (s_steps / s8_rate + overhead_per_stage)
  return {
      "experiment": experiment,
      "device": str(jax.devices()[0].device_kind),
      "num_devices": jax.local_device_count(),
      "jax": jax.__version__,
      "scan_method": config.model.scan_method,
      "measured": {
          "steps_per_sec": rates,
          "short_run_wall_s": wall,
          "overhead_per_stage_s": overhead_per_stage,
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "synthetic_num_train": num_train,
          "epochs": epochs,
      },
      "full_run_estimate": {
          "teacher_steps": t_steps,
          "student_steps_each": s_steps,
          "teacher_hours": teacher_s / 3600,
          "total_hours_low": low / 3600,
          "total_hours_high": high / 3600,
      },
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  run_p = sub.add_parser("run", help="train an experiment, then compare with the paper")
  run_p.add_argument("experiment", choices=sorted(CONFIGS))
  run_p.add_argument("--workdir", required=True)
  run_p.add_argument("--data_dir", default="", help="TFDS data_dir with the prepared dataset")
  cmp_p = sub.add_parser("compare", help="print the paper's numbers beside a run's")
  cmp_p.add_argument("experiment", choices=sorted(CONFIGS))
  cmp_p.add_argument("--workdir", required=True)
  sub.add_parser("commands", help="print the launch commands")
  est_p = sub.add_parser("estimate", help="time a short synthetic run, extrapolate")
  est_p.add_argument("experiment", choices=sorted(CONFIGS))
  est_p.add_argument("--out", default="")
  est_p.add_argument("--epochs", type=int, default=2)
  est_p.add_argument("--num_train", type=int, default=20480)
  est_p.add_argument("--scan_method", default="")
  args = parser.parse_args(argv)

  if args.command == "commands":
    for exp in ("mnist", "cifar10"):
      cmd = launch_command(exp, f"$PWD/runs/{exp}", "$HOME/tensorflow_datasets")
      print(" ".join(["python"] + cmd[1:]))
    return 0
  if args.command == "estimate":
    result = estimate(
        args.experiment, epochs=args.epochs, num_train=args.num_train, scan_method=args.scan_method
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
      pathlib.Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0
  if args.command == "run":
    cmd = launch_command(args.experiment, args.workdir, args.data_dir)
    print("running:", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=REPO)
    if code:
      return code
  results = pathlib.Path(args.workdir) / "results.json"
  if not results.is_file():
    print(f"error: {results} does not exist; run the experiment first", file=sys.stderr)
    return 2
  print(compare_table(args.experiment, summarize(results)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
