"""Executes colab/quickstart.ipynb and colab/pure_functions.ipynb headless (nbclient).

The kernel is this interpreter (a kernelspec written to a temporary
JUPYTER_PATH), started with MAMBA_PKD_NOTEBOOK_TEST=1 so the notebooks use the
checkout under test, install nothing and run the smoke settings. The
quickstart's run directory is then used to check the report's PNG and
experiments/plot_run.py.
"""

import importlib.util
import json
import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from conftest import shared_reference_run  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL = "mamba-pkd-test"
CELL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
  """A kernelspec for sys.executable and the notebook variables, set for the module."""
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
      json.dumps(
          {
              "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "display_name": "mamba-pkd test",
              "language": "python",
          }
      )
  )
  workdir = tmp_path_factory.mktemp("quickstart") / "run"
  values = {
      "JUPYTER_PATH": os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")]),
      "MAMBA_PKD_NOTEBOOK_TEST": "1",
      "MAMBA_PKD_REPO": str(REPO),
      "MAMBA_PKD_NOTEBOOK_WORKDIR": str(workdir),
      "PYTHONWARNINGS": "ignore",
  }
  saved = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  yield workdir
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _execute(name: str) -> "nbformat.NotebookNode":
  path = REPO / "colab" / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert (
          not cell.outputs and cell.execution_count is None
      ), f"{path.name}: commit notebooks with their outputs cleared"
  client = nbclient.NotebookClient(
      nb,
      kernel_name=KERNEL,
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()
  return nb


def _text(nb) -> str:
  """All stream and text/plain, text/markdown outputs, concatenated."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif "data" in out:
        parts.extend(out.data.get(k, "") for k in ("text/plain", "text/markdown"))
  return "\n".join(parts)


@pytest.fixture(scope="module")
def quickstart(notebook_env, tmp_path_factory):
  """(notebook, workdir, error): a failing cell is reported by the quickstart test;
  the report and plot tests still check what the run wrote before it.

  Waits for conftest's shared reference run first: the notebook's smoke stages (teacher, s1,
  s2 on one device) are the same programs, which it then reads from the compilation cache
  instead of compiling them at the same time.
  """
  shared_reference_run(tmp_path_factory)
  try:
    return _execute("quickstart"), notebook_env, None
  except nbclient.exceptions.CellExecutionError as e:
    return None, notebook_env, e


def test_quickstart_trains_prints_table_and_plot(quickstart):
  nb, workdir, error = quickstart
  if error is not None:
    raise error
  text = _text(nb)
  assert "| name | size | params | FLOPs | % teacher FLOPs |" in text
  assert re.search(r"\| teacher \| teacher \| [\d,]+ \|", text)
  assert re.search(r"\| prefix_1\.\.1 \|", text)
  images = [
      out
      for cell in nb.cells
      for out in cell.get("outputs", [])
      if "data" in out and "image/png" in out.data
  ]
  assert len(images) == 1  # the accuracy-vs-FLOPs plot, displayed inline
  assert (workdir / "results.json").is_file()
  results = json.loads((workdir / "results.json").read_text())
  assert results["meta"]["dataset"] == "synthetic"  # the smoke settings, never MNIST
  # Anytime inference: the export under 50% of the teacher's FLOPs, then a PNG.
  sidecar = json.loads((workdir / "export" / "export.json").read_text())
  assert 0 < sidecar["pct_teacher_flops"] <= 50.0
  assert re.search(r"using prefix 1\.\.\d+ \(", text)
  assert re.search(r"example\.png\s+\d\s+\d\.\d{3}\s+\d", text)


def test_report_png_is_800x500(quickstart):
  _, workdir, _ = quickstart
  path = workdir / "accuracy_vs_flops.png"
  with Image.open(path) as img:
    img.verify()  # raises on a truncated or corrupt file
  with Image.open(path) as img:
    assert img.format == "PNG"
    assert img.size == (800, 500)


def test_plot_run_writes_training_curves(quickstart, tmp_path):
  _, workdir, _ = quickstart
  spec = importlib.util.spec_from_file_location("plot_run", REPO / "experiments" / "plot_run.py")
  plot_run = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plot_run)
  metrics = plot_run.read_metrics(workdir)
  assert "teacher" in metrics and len(metrics) >= 2
  steps, losses = metrics["teacher"]["loss"]
  assert steps == sorted(steps) and all(v > 0 for v in losses)
  out = tmp_path / "curves.png"
  assert plot_run.main([f"--workdir={workdir}", f"--out={out}"]) == 0
  with Image.open(out) as img:
    assert img.format == "PNG" and img.size == (1000, 400)  # two 500x400 panels
  assert plot_run.main([f"--workdir={workdir}", "--metrics=nope"]) == 2


def test_pure_functions_notebook(notebook_env):
  nb = _execute("pure_functions")
  text = _text(nb)
  diffs = re.findall(r"(\w+): max \|[^|]+\| = ([0-9.e+-]+)", text)
  assert {name for name, _ in diffs} >= {"parallel", "chunked", "fused", "numpy", "gradient"}
  for name, value in diffs:
    assert float(value) < 1e-4, (name, value)
  assert "analytic parameter count matches the tree: True" in text
  assert "stage loss matches: True" in text
  assert "gradient reaches the student: True | the prefix: False" in text
  from mamba_pkd import flops, ladder_configs  # pylint: disable=g-import-not-at-top

  sizes = ladder_configs("mnist", image_shape=(28, 28, 1), num_classes=10)
  s1, teacher = flops.count_flops(sizes["s1"]), flops.count_flops(sizes["teacher"])
  assert f"s1: {s1:>12,} FLOPs/image  {100 * s1 / teacher:6.2f}% of the teacher" in text
