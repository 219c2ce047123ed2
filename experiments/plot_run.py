r"""Plot a run's training curves (metrics.jsonl) to a PNG: one panel per metric, one line per stage.

  python experiments/plot_run.py --workdir=runs/default            # -> runs/default/training_curves.png
  python experiments/plot_run.py --workdir=runs/default --metrics=loss,accuracy,grad_norm \
      --out=/tmp/curves.png

``metrics.jsonl`` holds one JSON object per logged step,
``{"stage": "student_2_s3_try1", "step": 50, "loss": ..., "accuracy": ..., ...}``,
written by process 0 during training (the same values go to TensorBoard under
``<workdir>/tensorboard`` when tensorboardX is installed: ``tensorboard
--logdir=<workdir>/tensorboard``). Each stage restarts its step count, so the
x axis is the step within the stage. The figure is 1000 x 400 px per row of
two panels.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Sequence

DEFAULT_METRICS = ("loss", "accuracy")
PLOT_NAME = "training_curves.png"
PANEL_IN = (5.0, 4.0)  # inches per panel, at DPI
DPI = 100


def read_metrics(path: str | pathlib.Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
  """``metrics.jsonl`` -> {stage: {metric: (steps, values)}}, stages in first-seen order.

  Raises:
    ValueError: missing file, or a line that is not a JSON object with
      ``stage`` and ``step`` (the line number is named).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  if not path.is_file():
    raise ValueError(f"{path} does not exist; pass a run's --workdir or its metrics.jsonl")
  out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        stage, step = str(record["stage"]), int(record["step"])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}:{number} is not a metrics record with 'stage' and 'step' "
            f"({type(e).__name__}: {e})"
        ) from None
      series = out.setdefault(stage, {})
      for name, value in record.items():
        if name in ("stage", "step") or not isinstance(value, (int, float)):
          continue
        steps, values = series.setdefault(name, ([], []))
        steps.append(step)
        values.append(float(value))
  if not out:
    raise ValueError(f"{path} has no records")
  return out


def plot_metrics(
    metrics: dict, out_png: str | pathlib.Path, names: Sequence[str] = DEFAULT_METRICS
) -> pathlib.Path:
  """Saves one panel per metric name (two per row), one line per stage; returns the path.

  Raises:
    ValueError: a metric no stage logged (the logged names are listed).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  logged = sorted({m for series in metrics.values() for m in series})
  missing = [n for n in names if n not in logged]
  if missing or not names:
    raise ValueError(f"metrics {missing or list(names)} were not logged; logged: {logged}")
  cols = min(2, len(names))
  rows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(PANEL_IN[0] * cols, PANEL_IN[1] * rows), dpi=DPI)
  FigureCanvasAgg(fig)
  for i, name in enumerate(names):
    ax = fig.add_subplot(rows, cols, i + 1)
    for stage, series in metrics.items():
      if name in series:
        steps, values = series[name]
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=stage)
    ax.set_xlabel("step (within the stage)")
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    if name == "loss":
      ax.set_yscale("log")
    ax.legend(fontsize="small")
  fig.tight_layout()
  out_png = pathlib.Path(out_png)
  fig.savefig(out_png, dpi=DPI, format="png", metadata={"Software": None})
  return out_png


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a run's --workdir (or a metrics.jsonl)")
  parser.add_argument("--out", default="", help=f"PNG path (default <workdir>/{PLOT_NAME})")
  parser.add_argument(
      "--metrics",
      default=",".join(DEFAULT_METRICS),
      help="comma-separated metric names (default loss,accuracy)",
  )
  args = parser.parse_args(argv)
  try:
    metrics = read_metrics(args.workdir)
    src = pathlib.Path(args.workdir)
    out = args.out or (src if src.is_dir() else src.parent) / PLOT_NAME
    path = plot_metrics(metrics, out, [m for m in args.metrics.split(",") if m])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path} ({len(metrics)} stages: {', '.join(metrics)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
