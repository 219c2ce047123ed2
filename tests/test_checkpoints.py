"""Tests of mamba_pkd.checkpoints: round trips, pruning, completion, corruption, multi-host.

Run as a script (``python tests/test_checkpoints.py worker ...``) this file is
also the per-process worker of the two-process ``jax.distributed`` test.
"""

import logging
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_pkd import checkpoints

# A failed Orbax restore (the corruption tests) leaves TensorStore reads whose
# callbacks fire after Orbax's asyncio loop closed ("Event loop is closed"),
# reported by pytest as unraisable, possibly during a later test; harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _train_state(seed: int) -> dict:
  """A small train state with non-trivial adam moments, several dtypes.

  Shapes: params dense/kernel [3, 4] f32, dense/bias [4] f32, emb [5, 2] bf16,
  norm/scale [4] f16; adam state (count, mu, nu) like params; ``step`` int32 [];
  ``rng`` uint32 [2] (raw key data).
  """
  rng = np.random.default_rng(seed)
  params = {
      "dense": {
          "kernel": rng.normal(size=(3, 4)).astype(np.float32),
          "bias": rng.normal(size=(4,)).astype(np.float32),
      },
      "emb": rng.normal(size=(5, 2)).astype(jnp.bfloat16),
      "norm": {"scale": rng.normal(size=(4,)).astype(np.float16)},
  }
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  for _ in range(2):  # two updates so mu/nu/count are not zeros/ones
    grads = jax.tree.map(lambda p: jnp.sin(p.astype(jnp.float32)).astype(p.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  to_host = lambda x: np.asarray(x)
  return {
      "params": jax.tree.map(to_host, params),
      "opt_state": jax.tree.map(to_host, opt_state),
      "step": np.asarray(10 + seed, np.int32),
      "rng": np.asarray(jax.random.key_data(jax.random.key(seed))),
  }


def _assert_bit_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    w = _leaf_at(want, path)
    name = jax.tree_util.keystr(path)
    assert type(g) is np.ndarray, name
    assert g.dtype == w.dtype and g.shape == w.shape, name
    assert g.tobytes() == w.tobytes(), name


def _leaf_at(tree, path):
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      tree = tree[key.key]
    elif isinstance(key, jax.tree_util.SequenceKey):
      tree = tree[key.idx]
    else:  # GetAttrKey of a namedtuple (optax states)
      tree = getattr(tree, key.name)
  return tree


def _step_dirs(stage: pathlib.Path) -> list:
  return sorted(p.name for p in (stage / "steps").iterdir() if p.name.isdigit())


def _damage(step_path: pathlib.Path, how: str) -> int:
  """Truncates to half / deletes every OCDBT data file (in a ``d/`` dir) of a step."""
  files = [p for p in step_path.rglob("*") if p.is_file() and p.parent.name == "d"]
  for p in files:
    if how == "truncate":
      with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)
    else:
      p.unlink()
  return len(files)


def test_stage_dir():
  assert checkpoints.stage_dir("/w", "student_1") == pathlib.Path("/w/ckpt/student_1")
  for bad in ("", "../x", "a/b", ".hidden", 3):
    with pytest.raises(ValueError, match="stage_name"):
      checkpoints.stage_dir("/w", bad)


def test_save_restore_round_trip_is_bit_identical(tmp_path):
  state = _train_state(0)
  with checkpoints.StageCheckpointer(tmp_path / "s") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(state) is None
    ckpt.save(7, state)
  # A fresh instance, as after a restart; template given as shapes/dtypes only.
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with checkpoints.StageCheckpointer(tmp_path / "s") as ckpt:
    assert ckpt.latest_step() == 7
    step, restored = ckpt.restore_latest(template)
  assert step == 7
  _assert_bit_identical(restored, state)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert int(restored["opt_state"][0].count) == 2


def test_latest_step_and_max_to_keep_pruning(tmp_path, caplog):
  stage = tmp_path / "s"
  with checkpoints.StageCheckpointer(stage, max_to_keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, _train_state(step))
      assert ckpt.latest_step() == step
    assert _step_dirs(stage) == ["3", "4"]
    ckpt.save(4, _train_state(4))  # the resumed step again: skipped
    with pytest.raises(ValueError, match="older than the newest saved step 4"):
      ckpt.save(2, _train_state(2))
    with pytest.raises(ValueError, match="step=-1"):
      ckpt.save(-1, _train_state(2))
    step, restored = ckpt.restore_latest(_train_state(0))
  assert step == 4
  _assert_bit_identical(restored, _train_state(4))
  with pytest.raises(ValueError, match="max_to_keep=0"):
    checkpoints.StageCheckpointer(stage, max_to_keep=0)


def test_mark_complete_is_complete_load_final(tmp_path):
  params = _train_state(1)["params"]
  stage = tmp_path / "s"
  with checkpoints.StageCheckpointer(stage) as ckpt:
    assert not ckpt.is_complete()
    with pytest.raises(ValueError, match="not complete"):
      ckpt.load_final(params)
    with pytest.raises(ValueError, match="JSON-serializable"):
      ckpt.mark_complete(params, {"model": object()})
    assert not ckpt.is_complete()
    ckpt.mark_complete(
        params, {"accuracy": np.float32(0.75), "flops": 1234, "size": "tiny", "seed": 3}
    )
    with pytest.raises(ValueError, match="already complete"):
      ckpt.mark_complete(params, {})
  with checkpoints.StageCheckpointer(stage) as ckpt:
    assert ckpt.is_complete()
    got_params, info = ckpt.load_final(params)
  _assert_bit_identical(got_params, params)
  assert info == {"accuracy": 0.75, "flops": 1234, "size": "tiny", "seed": 3}


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupted_newest_step_falls_back_with_warning(tmp_path, caplog, how):
  stage = tmp_path / "s"
  with checkpoints.StageCheckpointer(stage) as ckpt:
    ckpt.save(1, _train_state(1))
    ckpt.save(2, _train_state(2))
  assert _damage(stage / "steps" / "2", how) > 0
  with checkpoints.StageCheckpointer(stage) as ckpt:
    with caplog.at_level(logging.WARNING):
      step, restored = ckpt.restore_latest(_train_state(0))
    assert step == 1
    _assert_bit_identical(restored, _train_state(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 2" in m and "unreadable" in m for m in warnings), warnings
    # The bad step was moved aside (kept), so the resumed run can save step 2.
    assert _step_dirs(stage) == ["1"]
    assert [p.name.split("-")[0] for p in (stage / "corrupted").iterdir()] == ["2"]
    ckpt.save(2, _train_state(5))
    step, restored = ckpt.restore_latest(_train_state(0))
  assert step == 2
  _assert_bit_identical(restored, _train_state(5))


def test_no_readable_step_or_wrong_template_raises(tmp_path):
  stage = tmp_path / "s"
  state = _train_state(1)
  with checkpoints.StageCheckpointer(stage) as ckpt:
    ckpt.save(1, state)
    wrong_shape = jax.tree.map(lambda x: x, state)
    wrong_shape["params"]["dense"]["kernel"] = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]: stored float32\[3, 4\]"):
      ckpt.restore_latest(wrong_shape)
    _damage(stage / "steps" / "1", "truncate")
    with pytest.raises(ValueError, match=r"none of the checkpoints .*\(step 1: ValueError"):
      ckpt.restore_latest(state)
    assert _step_dirs(stage) == ["1"]  # nothing moved when nothing is good


def test_half_written_tmp_dir_is_ignored_and_reported(tmp_path, caplog):
  stage = tmp_path / "s"
  state = _train_state(1)
  with checkpoints.StageCheckpointer(stage) as ckpt:
    ckpt.save(1, state)
  # What a save killed half-way leaves behind.
  tmp = stage / "steps" / f"2{checkpoints.ORBAX_TMP_MARKER}"
  (tmp / "default").mkdir(parents=True)
  (tmp / "default" / "_METADATA").write_text("{")
  with caplog.at_level(logging.WARNING):
    with checkpoints.StageCheckpointer(stage, is_writer=False) as reader:
      assert reader.latest_step() == 1
      step, restored = reader.restore_latest(state)
  assert step == 1
  _assert_bit_identical(restored, state)
  assert any(
      "half-written" in r.getMessage() and tmp.name in r.getMessage() for r in caplog.records
  ), [r.getMessage() for r in caplog.records]
  assert tmp.exists()  # readers never delete
  with checkpoints.StageCheckpointer(stage) as writer:
    assert writer.latest_step() == 1
  assert not tmp.exists()  # the writer cleans it up


def test_non_writer_writes_nothing(tmp_path):
  state = _train_state(1)
  with checkpoints.StageCheckpointer(tmp_path / "ckpt" / "s", is_writer=False) as reader:
    reader.save(1, state)
    reader.mark_complete(state["params"], {"accuracy": 1.0})
    assert reader.latest_step() is None
    assert reader.restore_latest(state) is None
    assert not reader.is_complete()
  assert list(tmp_path.iterdir()) == []


def test_typed_key_is_rejected(tmp_path):
  with checkpoints.StageCheckpointer(tmp_path / "s") as ckpt:
    with pytest.raises(ValueError, match="key_data"):
      ckpt.save(1, {"rng": jax.random.key(0)})
    assert ckpt.latest_step() is None


# -- two processes (jax.distributed on CPU) ------------------------------------


def _worker(process_id: int, port: int, stage: str) -> None:
  """One process of the two-process test; asserts, exits non-zero on failure."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
  )
  state = _train_state(3)
  ckpt = checkpoints.StageCheckpointer(stage, is_writer=process_id == 0)
  assert ckpt.restore_latest(state) is None
  multihost_utils.sync_global_devices("looked")  # nobody saves before all looked
  ckpt.save(5, state)  # every process calls it; only process 0 writes
  ckpt.mark_complete(state["params"], {"accuracy": 0.5})
  multihost_utils.sync_global_devices("saved")
  step, restored = ckpt.restore_latest(state)
  params, info = ckpt.load_final(state["params"])
  assert step == 5 and info == {"accuracy": 0.5}
  _assert_bit_identical(restored, state)
  _assert_bit_identical(params, state["params"])
  multihost_utils.sync_global_devices("restored")  # nobody closes while others read
  ckpt.close()
  print(f"worker {process_id} ok", flush=True)


def test_two_processes_only_process_0_writes_and_no_deadlock(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, "worker", str(i), str(port), str(tmp_path / "s")],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0 and f"worker {i} ok" in out, out[-3000:]
  # Only process 0 wrote: no per-process data of process 1 anywhere.
  assert not list((tmp_path / "s").rglob("*process_1*"))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
