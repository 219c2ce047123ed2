"""Tests of mamba_pkd.report: table, JSON, plot and latency."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mamba_pkd import report


def _rows(latency=False):
  return [
      report.Row(
          name="teacher",
          kind="teacher",
          size="base",
          params=1_234_567,
          flops=98_765_432,
          pct_teacher_flops=100.0,
          accuracy=0.9912,
          agreement=1.0,
          latency_ms_b1=2.5 if latency else None,
          latency_ms_b256=0.125 if latency else None,
      ),
      report.Row(
          name="student_1",
          kind="student",
          size="xs",
          params=12_345,
          flops=np.int64(987_654),
          pct_teacher_flops=1.0,
          accuracy=np.float32(0.875),
          agreement=0.8801,
      ),
      report.Row(
          name="prefix_1..2",
          kind="prefix",
          size="xs+s",
          params=40_000,
          flops=2_500_000,
          pct_teacher_flops=2.531,
          accuracy=0.9,
          agreement=0.91,
      ),
      report.Row(
          name="baseline_2",
          kind="baseline",
          size="s",
          params=27_655,
          flops=1_512_346,
          pct_teacher_flops=1.531,
          accuracy=0.88,
          agreement=0.89,
      ),
  ]


def test_table_formats_values():
  table = report.format_table(_rows(latency=True)[:3])
  lines = table.strip().split("\n")
  assert len(lines) == 5  # header, separator, 3 rows
  assert lines[0].startswith("| name | size | params | FLOPs | % teacher FLOPs")
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  assert cells == [
      "teacher",
      "base",
      "1,234,567",
      "98.8M",
      "100.00",
      "99.12",
      "100.00",
      "2.5",
      "0.125",
  ]
  cells = [c.strip() for c in lines[3].strip("|").split("|")]
  assert cells == ["student_1", "xs", "12,345", "988k", "1.00", "87.50", "88.01", "-", "-"]
  cells = [c.strip() for c in lines[4].strip("|").split("|")]
  assert cells[:7] == ["prefix_1..2", "xs+s", "40,000", "2.5M", "2.53", "90.00", "91.00"]


def test_json_round_trip_and_timing_section(tmp_path):
  rows = _rows(latency=True)
  meta = {"dataset": "mnist5k", "seed": 0, "lr": np.float32(1e-3), "ladder": ("xs", "s")}
  paths = report.write_report(tmp_path, rows, meta=meta)
  data = json.loads(paths["results_json"].read_text())
  assert list(data) == ["meta", "rows", "timing"]
  assert data["meta"] == {"dataset": "mnist5k", "seed": 0, "lr": 0.001, "ladder": ["xs", "s"]}
  assert "latency_ms_b1" not in data["rows"][0]
  assert data["timing"] == {"teacher": {"latency_ms_b1": 2.5, "latency_ms_b256": 0.125}}
  back, meta_back = report.read_results(paths["results_json"])
  assert back == rows
  assert meta_back["ladder"] == ["xs", "s"]
  md = paths["results_md"].read_text()
  assert report.format_table(rows) in md
  assert "mnist5k" in md


def test_results_json_is_byte_identical_without_latency(tmp_path):
  a = report.write_report(tmp_path / "a", _rows(), meta={"seed": 1, "T": 4.0})
  b = report.write_report(tmp_path / "b", _rows(), meta={"T": 4.0, "seed": 1})
  assert a["results_json"].read_bytes() == b["results_json"].read_bytes()
  assert "timing" not in json.loads(a["results_json"].read_text())
  # Float noise below 8 significant digits does not change the file.
  noisy = list(_rows())
  noisy[1] = report.Row(**{**noisy[1].__dict__, "accuracy": 0.875 + 1e-12})
  c = report.write_report(tmp_path / "c", noisy, meta={"seed": 1, "T": 4.0})
  assert c["results_json"].read_bytes() == a["results_json"].read_bytes()


def test_plot_is_png_of_expected_size(tmp_path):
  paths = report.write_report(tmp_path, _rows(), meta={})
  assert paths["plot"].name == "accuracy_vs_flops.png"
  with Image.open(paths["plot"]) as image:
    assert image.format == "PNG"
    assert image.size == (800, 500)
    image.load()
    # Not a blank canvas.
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def test_latency_is_positive_and_finite():
  predict = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  ms = report.compute_latency_ms(predict, jnp.ones((64, 64)), repeats=5, warmup=1)
  assert math.isfinite(ms) and ms > 0
  with pytest.raises(ValueError, match="repeats"):
    report.compute_latency_ms(predict, jnp.ones((4, 4)), repeats=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="teacherx"), "kind"),
        (dict(accuracy=1.5), "accuracy"),
        (dict(agreement=float("nan")), "agreement"),
        (dict(params=-1), "params"),
    ],
)
def test_bad_rows_raise_value_error(kwargs, field):
  base = dict(
      name="m",
      kind="student",
      size="xs",
      params=1,
      flops=1,
      pct_teacher_flops=1.0,
      accuracy=0.5,
      agreement=0.5,
  )
  with pytest.raises(ValueError, match=field):
    report.Row(**{**base, **kwargs})


def test_write_report_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match="empty"):
    report.write_report(tmp_path, [], meta={})
  rows = _rows()
  with pytest.raises(ValueError, match="student_1"):
    report.write_report(tmp_path, rows + [rows[1]], meta={})
  with pytest.raises(ValueError, match="meta.bad"):
    report.write_report(tmp_path, rows, meta={"bad": float("inf")})
  assert not (tmp_path / "results.json").exists()
