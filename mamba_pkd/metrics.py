"""Observability of a run: ``metrics.jsonl``, TensorBoard summaries and quiet library logs.

:class:`MetricsWriter` appends one JSON line per logged step and stage
(process 0 only) and mirrors it to TensorBoard when ``tensorboardX`` is
installed; :func:`quiet_library_logs` keeps Orbax's INFO chatter out of the
progress output of every command-line entry point.
"""

from __future__ import annotations

import json
import logging as std_logging
import pathlib
from typing import Mapping

from absl import logging


def quiet_library_logs(level: int = std_logging.WARNING) -> None:
  """Keeps Orbax's log lines below ``level`` out of the output (training keeps its warnings;
  export and predict pass ``logging.ERROR``: 'directory is read only' is noise there)."""

  def keep(record) -> bool:
    return record.levelno >= level or "orbax" not in record.pathname

  logging.get_absl_handler().addFilter(keep)
  std_logging.getLogger("absl").addFilter(keep)


class MetricsWriter:
  """JSON-lines metrics (``metrics.jsonl``) and TensorBoard summaries, process 0 only."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
    except ImportError:
      logging.info(
          "tensorboardX is not installed: TensorBoard summaries are off "
          "(metrics.jsonl is still written)"
      )

  def write(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a", encoding="utf-8") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(f"{stage}/{name}", float(value), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
