"""A rerun with a changed config on a finished workdir: stop with one line, or retrain exactly
the changed stages (issue 13). Both start from a copy of the shared smoke run."""

import json
import shutil

import pytest

from conftest import run_smoke, shared_reference_run, smoke_data_flag


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return shared_reference_run(tmp_path_factory), smoke_data_flag(tmp_path_factory)


def _copy(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  return workdir


def test_changed_config_stops_with_one_line_and_keeps_config_json(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = {p.name: p.read_bytes() for p in (workdir / "config.json", workdir / "results.json")}
  out = run_smoke(workdir, 1, reference[1], "--config.student.epochs=3", "--config.pkd.alpha=0.9")
  assert out.returncode == 2, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
      "error: stage student_1_s1_try1 was trained with a different config (pkd.alpha: 0.5 -> "
      "0.9, steps: 12 -> 18, student.epochs: 2 -> 3); use a new --workdir, or pass "
      "--retrain_changed to retrain the changed stages and those after them"
  ]
  # config.json still describes the checkpoints; nothing was trained or replaced.
  for name, content in before.items():
    assert (workdir / name).read_bytes() == content, name
  assert "compiled in" not in out.stderr
  assert not (workdir / "ckpt" / ".replaced").exists()


def test_retrain_changed_retrains_exactly_the_changed_stages(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  out = run_smoke(workdir, 1, reference[1], "--config.pkd.cascade_focus=0.25", "--retrain_changed")
  assert out.returncode == 0, out.stderr[-3000:]
  trained = sorted(
      line.split("stage ")[1].split(":")[0]
      for line in out.stderr.splitlines()
      if "compiled in" in line
  )
  # pkd.cascade_focus weights a student's examples by the doubt of the students before it:
  # student 1 (nobody before it), the teacher and the CE baseline stay; student 2 is retrained.
  assert trained == ["student_2_s2_try1"]
  for stage in ("teacher", "student_1_s1_try1", "baseline_1_s1"):
    assert f"stage {stage}: already complete" in out.stderr
  replaced = sorted(p.name.rsplit("-", 2)[0] for p in (workdir / "ckpt" / ".replaced").iterdir())
  assert replaced == ["student_2_s2_try1"]
  assert json.loads((workdir / "config.json").read_text())["pkd"]["cascade_focus"] == 0.25
  history = (workdir / "config_history.jsonl").read_text().splitlines()
  assert json.loads(history[-1])["config"]["pkd"]["cascade_focus"] == 0.25
