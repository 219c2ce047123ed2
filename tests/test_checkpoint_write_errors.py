"""A full disk during a checkpoint write: one clear error, the previous step intact, resume.

The fault is injected into Orbax's commit of a step: the step's data files are
already written into its temporary directory when the write of the commit
marker raises ``OSError(ENOSPC)``, as a disk that fills up mid-save would.
"""

import errno

import numpy as np
import pytest

from mamba_pkd import checkpoints
from orbax.checkpoint._src.path import async_path

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(value: float) -> dict:
  return {
      "params": {"w": np.full((3, 4), value, np.float32), "b": np.arange(4, dtype=np.float32)},
      "step": np.asarray(int(value), np.int32),
  }


def test_enospc_during_save_is_one_line_keeps_previous_and_resumes(tmp_path, monkeypatch):
  stage = checkpoints.stage_dir(tmp_path, "student_1")
  ckpt = checkpoints.StageCheckpointer(stage)
  ckpt.save(4, _state(4.0))

  calls = []

  async def failing_write_text(path, text, *args, **kwargs):
    calls.append(str(path))
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(async_path, "write_text", failing_write_text)
  with pytest.raises(checkpoints.CheckpointWriteError) as info:
    ckpt.save(8, _state(8.0))
  monkeypatch.undo()
  assert calls, "the fault was not injected: Orbax no longer writes the commit marker there"
  message = str(info.value)
  assert "\n" not in message
  assert "stage student_1" in message
  assert "step 8" in message
  assert str(stage / "steps") in message
  assert "No space left on device" in message and "ENOSPC" in message
  assert "step 4" in message  # the kept one
  assert info.value.errno == errno.ENOSPC
  ckpt.close()

  # The data of step 8 was partly written (a temporary directory), step 4 untouched.
  leftovers = [p.name for p in (stage / "steps").iterdir()]
  assert "4" in leftovers and "8" not in leftovers
  assert any(checkpoints.ORBAX_TMP_MARKER in name for name in leftovers), leftovers

  # The rerun: a new checkpointer resumes from step 4 with its exact values.
  rerun = checkpoints.StageCheckpointer(stage)
  step, state = rerun.restore_latest(_state(0.0))
  assert step == 4
  np.testing.assert_array_equal(state["params"]["w"], _state(4.0)["params"]["w"])
  rerun.save(8, _state(8.0))  # and the space is back: step 8 can be written again
  assert rerun.restore_latest(_state(0.0))[0] == 8
  rerun.close()


def test_enospc_on_the_first_save_says_no_earlier_checkpoint(tmp_path, monkeypatch):
  ckpt = checkpoints.StageCheckpointer(checkpoints.stage_dir(tmp_path, "teacher"))

  async def failing_write_text(path, text, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(async_path, "write_text", failing_write_text)
  with pytest.raises(
      checkpoints.CheckpointWriteError, match=r"stage teacher: .*step 2.*no earlier"
  ):
    ckpt.save(2, _state(2.0))
  monkeypatch.undo()
  ckpt.close()


def test_other_save_errors_are_not_rewrapped(tmp_path):
  ckpt = checkpoints.StageCheckpointer(checkpoints.stage_dir(tmp_path, "teacher"))
  with pytest.raises(ValueError, match="typed PRNG key"):
    import jax  # pylint: disable=g-import-not-at-top

    ckpt.save(1, {"key": jax.random.key(0)})
  ckpt.close()
