"""Results of a PKD run: table, JSON and the accuracy-vs-FLOPs plot.

One :class:`Row` per evaluated classifier (the teacher, each student alone,
each ensemble prefix, baselines, each early-exit cascade budget).
:func:`write_report` writes, into the workdir given by the caller (the caller
decides which process writes):

* ``results.json``: ``{"meta": ..., "rows": [...]}`` and, only when some
  latency was measured, a separate ``"timing"`` section keyed by row name.
  Keys are sorted, floats are rounded to 8 significant digits and nothing
  time-dependent is written outside ``"timing"``: with latency measurement off
  (all latencies None), identical rows and meta give a **byte-identical**
  ``results.json``, so runs can be compared with ``cmp``. With latency on,
  compare everything but ``"timing"``.
* ``results.md``: the Markdown table of :func:`format_table`.
* ``accuracy_vs_flops.png``: accuracy vs % of teacher FLOPs (log x), 800x500 px.

:func:`compute_latency_ms` measures the median wall-clock time of one call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

KINDS = ("teacher", "student", "prefix", "baseline", "direct", "family", "cascade", "pixels")
FIGURE_SIZE_IN = (8.0, 5.0)  # inches; at FIGURE_DPI: 800 x 500 px
FIGURE_DPI = 100
_SIGNIFICANT_DIGITS = 8
_TIMING_FIELDS = ("latency_ms_b1", "latency_ms_b256")
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PREDICTIONS_NPZ = "predictions.npz"
PLOT_PNG = "accuracy_vs_flops.png"


# ----------------------------------------------------------------------------
# Latency.
# ----------------------------------------------------------------------------


def compute_latency_ms(
    predict_fn: Callable[[Any], Any], images: Any, *, repeats: int = 20, warmup: int = 3
) -> float:
  """Median wall-clock milliseconds of one call ``predict_fn(images)``.

  The warm-up calls absorb compilation; every call is followed by
  ``jax.block_until_ready`` so asynchronous dispatch is timed to completion.
  The time is per call: divide by the batch size for per-image latency.

  Args:
    predict_fn: a (jit-compiled) callable of ``images``.
    images: its input, e.g. [B, H, W, C] array.
    repeats: number of timed calls (>= 1).
    warmup: number of untimed calls before (>= 0).

  Returns:
    Median milliseconds per call (float).
  """
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats must be an int >= 1, got {repeats!r}.")
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup must be an int >= 0, got {warmup!r}.")
  for _ in range(warmup):
    jax.block_until_ready(predict_fn(images))
  times_ms = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(predict_fn(images))
    times_ms.append((time.perf_counter() - start) * 1e3)
  return float(statistics.median(times_ms))


# ----------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  """One evaluated classifier.

  Attributes:
    name: unique label, e.g. "teacher", "student_1", "prefix_1..3",
      "baseline_2".
    kind: one of "teacher", "student", "prefix", "baseline", "direct" (chain mode: the
      deployed size distilled straight from the teacher, for comparison), "family" (a CNN
      or MLP student at the FLOPs of a Mamba student, ``cnn_k`` / ``mlp_k``), "cascade"
      (early exit under a budget; its FLOPs are the measured mean per test image),
      "pixels" (the sanity row: logistic regression on the pixels).
    size: name of the size on the model ladder (for a prefix, e.g. the sizes
      joined with "+").
    params: number of parameters (int).
    flops: inference FLOPs per image (int).
    pct_teacher_flops: ``100 * flops / teacher_flops``.
    accuracy: test accuracy in [0, 1].
    agreement: fraction of test examples whose argmax equals the teacher's.
    latency_ms_b1: per-image latency (ms) at batch 1, or None if not measured.
    latency_ms_b256: per-image latency (ms) at batch 256, or None.
  """

  name: str
  kind: str
  size: str
  params: int
  flops: int
  pct_teacher_flops: float
  accuracy: float
  agreement: float
  latency_ms_b1: float | None = None
  latency_ms_b256: float | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Row.name must be a non-empty str, got {self.name!r}.")
    if self.kind not in KINDS:
      raise ValueError(
          f"Row.kind must be one of {KINDS}, got {self.kind!r} " f"(row {self.name!r})."
      )
    # Accept NumPy/JAX scalars; store plain Python numbers.
    object.__setattr__(self, "size", str(self.size))
    for field in ("params", "flops"):
      value = int(getattr(self, field))
      if value < 0:
        raise ValueError(f"Row.{field} must be >= 0, got {value} " f"(row {self.name!r}).")
      object.__setattr__(self, field, value)
    for field in ("pct_teacher_flops", "accuracy", "agreement"):
      value = float(getattr(self, field))
      if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"Row.{field} must be finite and >= 0, got {value} " f"(row {self.name!r})."
        )
      object.__setattr__(self, field, value)
    for field in ("accuracy", "agreement"):
      if getattr(self, field) > 1.0:
        raise ValueError(
            f"Row.{field} must be a fraction in [0, 1], got "
            f"{getattr(self, field)} (row {self.name!r})."
        )
    for field in _TIMING_FIELDS:
      value = getattr(self, field)
      if value is not None:
        value = float(value)
        if not math.isfinite(value) or value < 0:
          raise ValueError(
              f"Row.{field} must be finite and >= 0 or None, " f"got {value} (row {self.name!r})."
          )
        object.__setattr__(self, field, value)


def _check_rows(rows: Sequence[Row]) -> list[Row]:
  rows = list(rows)
  if not rows:
    raise ValueError("rows is empty: nothing to report.")
  for i, row in enumerate(rows):
    if not isinstance(row, Row):
      raise ValueError(f"rows[{i}] must be a Row, got {type(row).__name__}.")
  names = [row.name for row in rows]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"row names must be unique, repeated: {duplicates}.")
  return rows


# ----------------------------------------------------------------------------
# JSON.
# ----------------------------------------------------------------------------


def _round(x: float) -> float:
  return float(f"{x:.{_SIGNIFICANT_DIGITS}g}")


def _to_json(value: Any, where: str) -> Any:
  """Converts ``value`` to plain JSON types with rounded floats."""
  if isinstance(value, (bool, str)) or value is None:
    return value
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)) or (
      isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
  ):
    value = np.asarray(value).item()
    if isinstance(value, (bool, int)):
      return value
    if not math.isfinite(value):
      raise ValueError(f"{where} is {value}, which JSON cannot store.")
    return _round(value)
  if isinstance(value, Mapping):
    return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray, jax.Array)):
    return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(list(value))]
  raise ValueError(
      f"{where} has type {type(value).__name__}, which cannot be written to "
      "results.json (use numbers, strings, lists or dicts)."
  )


def results_dict(rows: Sequence[Row], meta: Mapping[str, Any]) -> dict:
  """The content of ``results.json`` as plain Python objects."""
  rows = _check_rows(rows)
  out = {
      "meta": _to_json(dict(meta), "meta"),
      "rows": [
          _to_json(
              {k: v for k, v in dataclasses.asdict(row).items() if k not in _TIMING_FIELDS},
              f"rows[{i}]",
          )
          for i, row in enumerate(rows)
      ],
  }
  timing = {
      row.name: _to_json({f: getattr(row, f) for f in _TIMING_FIELDS}, f"timing.{row.name}")
      for row in rows
      if any(getattr(row, f) is not None for f in _TIMING_FIELDS)
  }
  if timing:
    out["timing"] = timing
  return out


def read_results(path: str | pathlib.Path) -> tuple[list[Row], dict]:
  """Reads a ``results.json`` back into rows (timing merged in) and meta."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  timing = data.get("timing", {})
  rows = [Row(**row, **timing.get(row["name"], {})) for row in data["rows"]]
  return rows, data["meta"]


# ----------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------


def _format_count(n: int) -> str:
  """Integer with an SI suffix and 3 significant digits: 1234567 -> '1.23M'."""
  for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if n >= threshold:
      return f"{n / threshold:.3g}{suffix}"
  return str(n)


def _format_latency(ms: float | None) -> str:
  return "-" if ms is None else f"{ms:.4g}"


_COLUMNS = (
    "name",
    "size",
    "params",
    "FLOPs",
    "% teacher FLOPs",
    "accuracy %",
    "agreement %",
    "latency b1 (ms)",
    "latency b256 (ms)",
)


def format_table(rows: Iterable[Row]) -> str:
  """Markdown table of the rows, in the given order.

  Params are written in full with thousands separators, FLOPs with an SI
  suffix (``'12.3M'``), percentages with 2 decimals, latencies per image in ms
  with 4 significant digits (``'-'`` when not measured).
  """
  rows = _check_rows(list(rows))
  lines = [
      "| " + " | ".join(_COLUMNS) + " |",
      "|" + "|".join(["---"] * 2 + ["---:"] * (len(_COLUMNS) - 2)) + "|",
  ]
  for row in rows:
    cells = (
        row.name,
        row.size,
        f"{row.params:,}",
        _format_count(row.flops),
        f"{row.pct_teacher_flops:.2f}",
        f"{100 * row.accuracy:.2f}",
        f"{100 * row.agreement:.2f}",
        _format_latency(row.latency_ms_b1),
        _format_latency(row.latency_ms_b256),
    )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _format_markdown(rows: Sequence[Row], meta: Mapping[str, Any]) -> str:
  parts = ["# Results\n"]
  if meta:
    parts.append(
        "\n".join(f"- {k}: {json.dumps(_to_json(v, k))}" for k, v in sorted(meta.items())) + "\n"
    )
  parts.append(format_table(rows))
  return "\n".join(parts)


# ----------------------------------------------------------------------------
# Plot.
# ----------------------------------------------------------------------------


def _plot_kind(row: Row) -> str:
  """The row's kind, with the family for ``family`` rows (``"family:cnn"``)."""
  return f"family:{row.name.split('_')[0]}" if row.kind == "family" else row.kind


def plot_accuracy_vs_flops(rows: Sequence[Row], path: str | pathlib.Path) -> None:
  """Saves accuracy (%) vs % of teacher FLOPs (log x) as an 800x500 PNG.

  Teacher: star; students alone: circles; ensemble prefixes: a line through
  the prefixes in order of FLOPs; baselines: squares; early-exit cascades: a
  dashed line through their measured mean FLOPs; CNN and MLP students (family rows):
  dotted lines through their rungs. Rows with 0 FLOPs cannot
  sit on a log axis and are left out of the plot (not of the table).
  """
  # The object-oriented API with the Agg canvas: no pyplot global state and no
  # dependence on the user's default backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = [r for r in _check_rows(rows) if r.pct_teacher_flops > 0]
  fig = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  styles = {
      "prefix": dict(marker="o", linestyle="-", color="tab:blue", label="ensemble prefix"),
      "student": dict(marker="o", linestyle="none", color="tab:orange", label="student alone"),
      "baseline": dict(
          marker="s", linestyle="none", color="tab:green", label="baseline (single model)"
      ),
      "direct": dict(
          marker="D", linestyle="none", color="tab:purple", label="distilled from the teacher"
      ),
      "cascade": dict(
          marker="v", linestyle="--", color="tab:brown", label="early-exit cascade (mean FLOPs)"
      ),
      "family:cnn": dict(marker="^", linestyle=":", color="tab:olive", label="CNN student"),
      "family:mlp": dict(marker="P", linestyle=":", color="tab:cyan", label="MLP student"),
      "family:mamba": dict(
          marker="o", linestyle=":", color="tab:orange", label="Mamba student (family row)"
      ),
      "pixels": dict(
          marker="x", linestyle="none", color="tab:gray", label="logistic regression on pixels"
      ),
      "teacher": dict(
          marker="*", markersize=14, linestyle="none", color="tab:red", label="teacher"
      ),
  }
  for kind, style in styles.items():
    selected = sorted(
        (r for r in rows if _plot_kind(r) == kind), key=lambda r: (r.pct_teacher_flops, r.name)
    )
    if not selected:
      continue
    ax.plot([r.pct_teacher_flops for r in selected], [100 * r.accuracy for r in selected], **style)
  ax.set_xscale("log")
  ax.set_xlabel("inference FLOPs per image (% of teacher, log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Accuracy vs. FLOPs")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=FIGURE_DPI, format="png", metadata={"Software": None})


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def write_predictions(
    workdir: str | pathlib.Path, labels: np.ndarray, predictions: Mapping[str, np.ndarray]
) -> pathlib.Path:
  """``<workdir>/predictions.npz``: ``labels`` [N] and each row's predicted class [N] by row
  name (int16), the per-example record that paired tests (McNemar) over rows and seeds
  read; :func:`read_predictions` reads it back."""
  arrays = {name: np.asarray(p, np.int16) for name, p in predictions.items()}
  if "labels" in arrays:
    raise ValueError("a row may not be named 'labels' (the key of the test labels)")
  for name, p in arrays.items():
    if p.shape != np.shape(labels):
      raise ValueError(f"predictions of {name!r} have shape {p.shape}, labels {np.shape(labels)}")
  path = pathlib.Path(workdir) / PREDICTIONS_NPZ
  with open(path, "wb") as f:
    np.savez_compressed(f, labels=np.asarray(labels, np.int16), **arrays)
  return path


def read_predictions(path: str | pathlib.Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``(labels [N], {row name: predicted class [N]})`` of a :func:`write_predictions` file."""
  with np.load(path) as data:
    arrays = {k: np.asarray(data[k]) for k in data.files}
  return arrays.pop("labels"), arrays


def write_report(
    workdir: str | pathlib.Path, rows: Sequence[Row], *, meta: Mapping[str, Any]
) -> dict[str, pathlib.Path]:
  """Writes ``results.json``, ``results.md`` and ``accuracy_vs_flops.png``.

  Args:
    workdir: directory to write into (created if missing).
    rows: the rows, in table order; names must be unique.
    meta: JSON-able run description (dataset, config name, seeds...). Keep
      timestamps out of it if ``results.json`` should be reproducible.

  Returns:
    ``{"results_json": path, "results_md": path, "plot": path}``.
  """
  rows = _check_rows(rows)
  content = results_dict(rows, meta)  # Validates before writing anything.
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  paths = {
      "results_json": workdir / RESULTS_JSON,
      "results_md": workdir / RESULTS_MD,
      "plot": workdir / PLOT_PNG,
  }
  paths["results_json"].write_text(
      json.dumps(content, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
  )
  paths["results_md"].write_text(_format_markdown(rows, meta), encoding="utf-8")
  plot_accuracy_vs_flops(rows, paths["plot"])
  return paths
