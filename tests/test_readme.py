"""The README's result blocks match experiments/render_readme.py's rendering of docs/results/."""

import json
import pathlib
import sys

import pytest

from mamba_pkd import ensemble, manifest, report
from mamba_pkd.preprocessing import Preprocessing

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # the scripts, importable by their file names
import render_readme  # pylint: disable=g-import-not-at-top,wrong-import-position
import reproduce_paper  # pylint: disable=g-import-not-at-top,wrong-import-position

COMMITTED = REPO / "docs" / "results" / "default" / "results.json"


@pytest.mark.skipif(
    not COMMITTED.is_file(),
    reason="docs/results/default/results.json is not committed yet: after the default run, "
    "`python experiments/render_readme.py --from_run=runs/default` copies it there",
)
def test_committed_readme_matches_rendering():
  assert render_readme.check() == []


def test_committed_readme_has_every_block_once():
  text = render_readme.README.read_text(encoding="utf-8")
  assert render_readme._marker_problems(text, render_readme.README) == []


def _member(name, size, flops, params, weight=1.0, scale=1.0):
  return ensemble.Member(
      name=name,
      stage=f"{name}_{size}",
      size=size,
      flops=flops,
      num_params=params,
      d_model=8,
      weight=weight,
      prefix_scale=scale,
      config={"d_model": 8, "n_layers": 1},
  )


def _row(name, kind, size, params, flops, acc, agree, b1=None):
  return report.Row(
      name=name,
      kind=kind,
      size=size,
      params=params,
      flops=flops,
      pct_teacher_flops=100 * flops / 200_000,
      accuracy=acc,
      agreement=agree,
      latency_ms_b1=b1,
      latency_ms_b256=None if b1 is None else b1 / 4,
  )


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
  """A finished-looking run: results.json (report.write_report) and ensemble.json; read only."""
  run = tmp_path_factory.mktemp("fake_run")
  rows = [
      _row("teacher", "teacher", "teacher", 5_000, 200_000, 0.98, 1.0, 1.25),
      _row("student_1", "student", "s1", 600, 2_000, 0.9, 0.91, 0.1),
      _row("student_2", "student", "s2", 900, 5_000, 0.95, 0.96, 0.2),
      _row("prefix_1..1", "prefix", "s1", 600, 2_000, 0.9, 0.91, 0.1),
      _row("prefix_1..2", "prefix", "s1+s2", 1_500, 7_000, 0.96, 0.97, 0.3),
      _row("baseline_1", "baseline", "s1", 600, 2_000, 0.89, 0.9, 0.1),
  ]
  report.write_report(run, rows, meta={"dataset": "fake", "mode": "ensemble"})
  manifest.write_manifest(
      run,
      mode="ensemble",
      dataset={"name": "fake", "seed": 0, "num_train": 10, "num_heldout": 2, "num_test": 5},
      preprocessing=Preprocessing((4, 4, 1), 3, (0.5,), (0.25,)),
      teacher=_member("teacher", "teacher", 200_000, 5_000),
      students=[
          _member("student_1", "s1", 2_000, 600, 1.0, 1.5),
          _member("student_2", "s2", 5_000, 900, 1.74, 2.25),
      ],
      baselines=[_member("baseline_1", "s1", 2_000, 600)],
      stop="max_students=2 reached",
      test_accuracy={"teacher": 0.98, "student_1": 0.9, "student_2": 0.96, "baseline_1": 0.89},
  )
  return run


@pytest.fixture
def rendered(tmp_path, fake_run):
  """(readme, results_root): a copy of the README rendered from the fake run's files."""
  readme = tmp_path / "README.md"
  readme.write_text(render_readme.README.read_text(encoding="utf-8"), encoding="utf-8")
  results_root = tmp_path / "results"
  common = [f"--from_run={fake_run}", f"--readme={readme}", f"--results_dir={results_root}"]
  render_readme.copy_run(fake_run, results_root, "digits8x8")  # the second run's block
  for name in (render_readme.FAMILIES, render_readme.SEEDS):  # the optional blocks' summaries
    summary = results_root / name / f"{name}.json"
    summary.parent.mkdir(parents=True)
    summary.write_bytes((render_readme.RESULTS_ROOT / name / summary.name).read_bytes())
  assert render_readme.main(common) == 0
  return readme, results_root


def test_from_run_copies_the_run_files_and_renders(rendered, fake_run):
  readme, results_root = rendered
  for name in ("results.json", "ensemble.json"):
    copied = results_root / "default" / name
    assert copied.read_bytes() == (fake_run / name).read_bytes()
  assert render_readme.check(readme, results_root) == []
  text = readme.read_text(encoding="utf-8")
  rows, _ = report.read_results(fake_run / "results.json")
  assert report.format_table(rows) in text  # the run's results.md table, verbatim
  assert (fake_run / "results.md").read_text(encoding="utf-8").endswith(report.format_table(rows))
  assert (
      "students s1, s2; weights eta_k 1, 1.74; prefix calibration scales 1.5, 2.25; "
      "the ladder stopped: max_students=2 reached." in text
  )


def test_paper_block_is_what_compare_prints(rendered, fake_run, capsys):
  readme, _ = rendered
  assert reproduce_paper.main(["compare", "default", f"--workdir={fake_run}"]) == 0
  printed = capsys.readouterr().out
  assert "| ensemble: % teacher FLOPs | 63.0 | 3.50 |" in printed
  assert printed.strip() in readme.read_text(encoding="utf-8")


def test_prose_outside_the_blocks_is_untouched(rendered):
  readme, _ = rendered
  original = render_readme.README.read_text(encoding="utf-8")
  new = readme.read_text(encoding="utf-8")

  def outside(text):
    for block in render_readme.BLOCKS:
      span = render_readme._span(text, block.name)
      if span is None and block.optional:
        continue
      start, end = span
      text = text[:start] + "<block>" + text[end:]
    return text

  assert outside(new) == outside(original)


@pytest.mark.parametrize(
    "block, old, new",
    [
        ("default-results", "| 90.00 | 91.00 |", "| 90.10 | 91.00 |"),
        ("default-ensemble", "weights eta_k 1, 1.74;", "weights eta_k 1, 1.75;"),
        ("paper-comparison", "| 63.0 | 3.50 |", "| 63.0 | 3.51 |"),
    ],
)
def test_check_names_the_block_with_a_changed_number(rendered, block, old, new, capsys):
  readme, results_root = rendered
  text = readme.read_text(encoding="utf-8")
  start, end = render_readme._span(text, block)
  assert old in text[start:end]
  readme.write_text(text[:start] + text[start:end].replace(old, new, 1) + text[end:])
  problems = render_readme.check(readme, results_root)
  assert len(problems) == 1 and f"{block!r} is stale" in problems[0], problems
  argv = ["--check", f"--readme={readme}", f"--results_dir={results_root}"]
  assert render_readme.main(argv) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{block!r} is stale" in err
  assert render_readme.main([f"--readme={readme}", f"--results_dir={results_root}"]) == 0
  assert render_readme.check(readme, results_root) == []


def test_check_names_missing_run_files(tmp_path):
  problems = render_readme.check(render_readme.README, tmp_path)
  assert problems and "'default-results' cannot be rendered" in problems[0]
  assert "results.json does not exist" in problems[0]
  assert "--from_run" in problems[0]


def test_check_names_a_missing_marker(rendered):
  readme, results_root = rendered
  text = readme.read_text(encoding="utf-8")
  readme.write_text(text.replace("<!-- END GENERATED: paper-comparison -->", ""))
  problems = render_readme.check(readme, results_root)
  assert len(problems) == 1 and "'paper-comparison'" in problems[0]


def test_check_refuses_files_of_two_runs(rendered):
  readme, results_root = rendered
  path = results_root / "default" / "ensemble.json"
  content = json.loads(path.read_text(encoding="utf-8"))
  content["teacher"]["flops"] += 1
  path.write_text(json.dumps(content), encoding="utf-8")
  problems = render_readme.check(readme, results_root)
  assert len(problems) == 1 and "'default-ensemble' cannot be rendered" in problems[0]
  assert "not from the same run" in problems[0]
