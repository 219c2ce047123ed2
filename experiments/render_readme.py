r"""Renders the README's result blocks from the run files committed under docs/results/.

  # after the default run finished: copy its results.json and ensemble.json into
  # docs/results/default/, then regenerate the README's blocks from them
  python experiments/render_readme.py --from_run=runs/default
  # regenerate the blocks from the committed files (after editing this script)
  python experiments/render_readme.py
  # exit 1 with a one-line message naming the first stale block (used by tests/test_readme.py)
  python experiments/render_readme.py --check

Each generated block sits between two marker comments in README.md::

  <!-- BEGIN GENERATED: default-results (experiments/render_readme.py) -->
  ...
  <!-- END GENERATED: default-results -->

and is rewritten in place; everything outside the markers is human-written and
left alone. The blocks:

* ``default-results``: the default run's table, ``mamba_pkd.report.format_table``
  of its ``results.json`` (the same function writes the run's ``results.md``);
* ``digits8x8-results``: the same for the default config on 8x8 digits
  (``docs/results/digits8x8/``, copied with ``--from_run=W --name=digits8x8``);
* ``paper-comparison``: ``reproduce_paper.compare_table("default", summarize(results.json))``,
  what ``python experiments/reproduce_paper.py compare default --workdir=W`` prints;
* ``default-ensemble``: one line of the ensemble's decisions (weights eta_k,
  prefix calibration scales, why the ladder stopped) from its ``ensemble.json``
  (``mamba_pkd.manifest.read_manifest``);
* ``families-results`` (optional: rendered where the README has its markers): Mamba, CNN
  and MLP students per FLOPs rung over seeds, ``experiments/families.py``'s table of
  ``docs/results/families/families.json``;
* ``seeds-results`` (optional, likewise): every row of the default job over seeds and the
  paired McNemar tests, ``experiments/seeds.py``'s tables of ``docs/results/seeds/seeds.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import re
import shutil
import sys
from typing import Callable

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import reproduce_paper  # pylint: disable=g-import-not-at-top,wrong-import-position

README = REPO / "README.md"
RESULTS_ROOT = REPO / "docs" / "results"
DEFAULT = "default"  # docs/results/default/: the default run (configs/default.py)
RUN_FILES = ("results.json", "ensemble.json")
SCRIPT = "experiments/render_readme.py"
BEGIN = "<!-- BEGIN GENERATED: {name} (" + SCRIPT + ") -->"
END = "<!-- END GENERATED: {name} -->"
_MARKER = re.compile(r"<!-- (BEGIN|END) GENERATED: ([\w.-]+)")


class SourceError(RuntimeError):
  """The files a block is rendered from are missing or do not belong together."""


def _show(path: pathlib.Path) -> str:
  """``path`` relative to the repository when it lies inside it."""
  path = pathlib.Path(path).resolve()
  try:
    return str(path.relative_to(REPO))
  except ValueError:
    return str(path)


def _run_file(results_root: pathlib.Path, run: str, filename: str) -> pathlib.Path:
  path = pathlib.Path(results_root) / run / filename
  if not path.is_file():
    raise SourceError(
        f"{_show(path)} does not exist; after the run finished, `python {SCRIPT} "
        f"--from_run=<its workdir>` copies it there"
    )
  return path


def render_results_table(results_root: pathlib.Path, run: str = DEFAULT) -> str:
  """A run's results table (``docs/results/<run>/``), exactly as its results.md shows it."""
  from mamba_pkd import report  # pylint: disable=g-import-not-at-top

  rows, _ = report.read_results(_run_file(results_root, run, "results.json"))
  return report.format_table(rows)


def render_paper_comparison(results_root: pathlib.Path) -> str:
  """The paper's numbers beside the default run's, as `reproduce_paper.py compare` prints them."""
  results = _run_file(results_root, DEFAULT, "results.json")
  return reproduce_paper.compare_table(DEFAULT, reproduce_paper.summarize(results))


def _num(x: float) -> str:
  return f"{x:.3g}"


def render_ensemble_decisions(results_root: pathlib.Path) -> str:
  """One line: each student's weight eta_k and prefix scale, and why the ladder stopped."""
  from mamba_pkd import manifest  # pylint: disable=g-import-not-at-top
  from mamba_pkd import report  # pylint: disable=g-import-not-at-top

  _run_file(results_root, DEFAULT, "ensemble.json")
  run = manifest.read_manifest(pathlib.Path(results_root) / DEFAULT)
  rows, _ = report.read_results(_run_file(results_root, DEFAULT, "results.json"))
  teacher_rows = [r for r in rows if r.kind == "teacher"]
  row_flops = teacher_rows[0].flops if teacher_rows else None
  if row_flops != run.teacher.flops:
    raise SourceError(
        f"{_show(pathlib.Path(results_root) / DEFAULT)}: results.json and ensemble.json are "
        f"not from the same run (teacher FLOPs {row_flops} vs {run.teacher.flops}); copy "
        f"both with `python {SCRIPT} --from_run=<its workdir>`"
    )
  sizes = ", ".join(m.size for m in run.students) or "none"
  weights = ", ".join(_num(m.weight) for m in run.students) or "-"
  scales = ", ".join(_num(m.prefix_scale) for m in run.students) or "-"
  where = f"`docs/results/{DEFAULT}/ensemble.json`"
  return (
      f"Ensemble decisions ({run.mode} mode, from {where}): students {sizes}; "
      f"weights eta_k {weights}; prefix calibration scales {scales}; "
      f"the ladder stopped: {run.stop.rstrip('.') or '(no reason recorded)'}.\n"
  )


def _read_summary(results_root: pathlib.Path, name: str, script) -> dict:
  """``<results_root>/<name>/<name>.json``, a summary written by ``experiments/<name>.py``."""
  import json  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(results_root) / name / f"{name}.json"
  if not path.is_file():
    raise SourceError(
        f"{_show(path)} does not exist; `python experiments/{name}.py summarize "
        f"--root=<the seeds' runs> --out={_show(path)}` writes it"
    )
  summary = json.loads(path.read_text(encoding="utf-8"))
  if summary.get("format") != script.FORMAT:
    raise SourceError(f"{_show(path)} is not a summary of experiments/{name}.py")
  return summary


def render_families_table(results_root: pathlib.Path) -> str:
  """Mamba, CNN and MLP students per FLOPs rung over seeds, from ``families/families.json``
  (written by ``python experiments/families.py summarize --out=...``)."""
  import families  # pylint: disable=g-import-not-at-top

  return families.format_table(_read_summary(results_root, FAMILIES, families))


def render_seeds_table(results_root: pathlib.Path) -> str:
  """Every row over seeds and the McNemar tests, from ``seeds/seeds.json`` (written by
  ``python experiments/seeds.py summarize --out=...``)."""
  import seeds  # pylint: disable=g-import-not-at-top

  return seeds.format_table(_read_summary(results_root, SEEDS, seeds))


@dataclasses.dataclass(frozen=True)
class Block:
  """A generated block; an ``optional`` one is rendered only where the README has its markers."""

  name: str
  render: Callable[[pathlib.Path], str]
  optional: bool = False


FAMILIES = "families"  # docs/results/families/families.json: experiments/families.py's summary
SEEDS = "seeds"  # docs/results/seeds/seeds.json: experiments/seeds.py's summary
BLOCKS = (
    Block("default-results", render_results_table),
    Block("digits8x8-results", functools.partial(render_results_table, run="digits8x8")),
    Block("default-ensemble", render_ensemble_decisions),
    Block("paper-comparison", render_paper_comparison),
    Block("families-results", render_families_table, optional=True),
    Block("seeds-results", render_seeds_table, optional=True),
)


def _present(text: str, block: Block) -> bool:
  return not block.optional or BEGIN.format(name=block.name) in text


def _span(text: str, name: str) -> tuple[int, int] | None:
  """(start, end) of the body between the block's markers; None if it has none."""
  begin, end = BEGIN.format(name=name), END.format(name=name)
  i = text.find(begin)
  if i < 0:
    return None
  start = i + len(begin)
  j = text.find(end, start)
  if j < 0:
    return None
  return start, j


def _marker_problems(text: str, readme: pathlib.Path) -> list[str]:
  """Missing, repeated, unknown or unclosed markers (one line each)."""
  problems = []
  known = {b.name for b in BLOCKS}
  found = [(m.group(1), m.group(2)) for m in _MARKER.finditer(text)]
  for name in sorted({n for _, n in found} - known):
    problems.append(f"{_show(readme)}: unknown generated block {name!r} (known: {sorted(known)})")
  optional = {b.name for b in BLOCKS if b.optional}
  for name in sorted(known):
    begins = sum(1 for k, n in found if k == "BEGIN" and n == name)
    ends = sum(1 for k, n in found if k == "END" and n == name)
    if name in optional and begins == ends == 0:
      continue
    if begins != 1 or ends != 1 or _span(text, name) is None:
      problems.append(
          f"{_show(readme)}: generated block {name!r} needs exactly one "
          f"`{BEGIN.format(name=name)}` followed by one `{END.format(name=name)}` "
          f"(found {begins} BEGIN and {ends} END markers)"
      )
  return problems


def _body(content: str) -> str:
  return "\n\n" + content.rstrip("\n") + "\n\n"


def render_text(text: str, results_root: pathlib.Path, readme: pathlib.Path = README) -> str:
  """``text`` with every generated block re-rendered from ``results_root``."""
  problems = _marker_problems(text, readme)
  if problems:
    raise SourceError(problems[0])
  for block in BLOCKS:
    if not _present(text, block):
      continue
    start, end = _span(text, block.name)
    text = text[:start] + _body(block.render(pathlib.Path(results_root))) + text[end:]
  return text


def check(readme: pathlib.Path = README, results_root: pathlib.Path = RESULTS_ROOT) -> list[str]:
  """One-line messages, one per stale or broken block; empty when the README is up to date."""
  readme = pathlib.Path(readme)
  text = readme.read_text(encoding="utf-8")
  problems = _marker_problems(text, readme)
  if problems:
    return problems
  for block in BLOCKS:
    if not _present(text, block):
      continue
    start, end = _span(text, block.name)
    try:
      want = _body(block.render(pathlib.Path(results_root)))
    except (SourceError, OSError, ValueError, KeyError) as e:
      problems.append(f"{_show(readme)}: generated block {block.name!r} cannot be rendered: {e}")
      continue
    have = text[start:end]
    if have != want:
      have_lines, want_lines = have.splitlines(), want.splitlines()
      line = next(
          (i for i, (a, b) in enumerate(zip(have_lines, want_lines)) if a != b),
          min(len(have_lines), len(want_lines)),
      )
      lineno = text[:start].count("\n") + 1 + line
      problems.append(
          f"{_show(readme)}: generated block {block.name!r} is stale (first difference at line "
          f"{lineno}); run `python {SCRIPT}` to regenerate it from {_show(results_root)}"
      )
  return problems


def copy_run(
    workdir: pathlib.Path, results_root: pathlib.Path = RESULTS_ROOT, name: str = DEFAULT
) -> pathlib.Path:
  """Copies a finished run's results.json and ensemble.json into ``results_root/<name>``."""
  from mamba_pkd import manifest  # pylint: disable=g-import-not-at-top
  from mamba_pkd import report  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  for filename in RUN_FILES:
    if not (workdir / filename).is_file():
      raise SourceError(f"{workdir / filename} does not exist: is {workdir} a finished run?")
  report.read_results(workdir / "results.json")  # both parse before anything is copied
  manifest.read_manifest(workdir)
  dest = pathlib.Path(results_root) / name
  dest.mkdir(parents=True, exist_ok=True)
  for filename in RUN_FILES:
    shutil.copyfile(workdir / filename, dest / filename)
  return dest


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--from_run", default="", help="a finished run's workdir: copy its files in, then render"
  )
  parser.add_argument(
      "--name",
      default=DEFAULT,
      help="with --from_run: the folder under docs/results/ (default: the default run; "
      "'digits8x8' for the 8x8 digits run)",
  )
  parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
  parser.add_argument("--readme", default=str(README))
  parser.add_argument("--results_dir", default=str(RESULTS_ROOT))
  args = parser.parse_args(argv)
  readme, results_root = pathlib.Path(args.readme), pathlib.Path(args.results_dir)
  if args.check and args.from_run:
    parser.error("--check reads the committed files; it does not take --from_run")
  if args.check:
    problems = check(readme, results_root)
    if problems:
      print(problems[0], file=sys.stderr)
      return 1
    print(f"{_show(readme)}: {len(BLOCKS)} generated blocks up to date")
    return 0
  try:
    if args.from_run:
      dest = copy_run(pathlib.Path(args.from_run), results_root, args.name)
      print(f"copied {', '.join(RUN_FILES)} from {args.from_run} to {dest}")
    text = readme.read_text(encoding="utf-8")
    new = render_text(text, results_root, readme)
  except (SourceError, OSError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if new != text:
    readme.write_text(new, encoding="utf-8")
  names = ", ".join(b.name for b in BLOCKS)
  print(f"{_show(readme)}: {'rewrote' if new != text else 'unchanged'} ({names})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
