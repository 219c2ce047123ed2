"""Stage fingerprints, their differences, the changed-stage message, the config history."""

import datetime
import hashlib
import json

import ml_collections
import numpy as np
import pytest

from mamba_pkd import models
from mamba_pkd import provenance


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every = 50
  c.student = ml_collections.ConfigDict(
      {"epochs": 2, "learning_rate": 5e-3, "batch_size": 128, "augment": "affine"}
  )
  c.teacher = ml_collections.ConfigDict({"epochs": 20, "learning_rate": 2e-3, "augment": "shift"})
  c.pkd = ml_collections.ConfigDict({"alpha": 0.5, "temperature": 4.0, "loss": "kd"})
  return c


DATA = {"dataset": "mnist5k", "seed": 0, "num_train": 3600, "num_heldout": 400, "num_test": 1000}
MODEL = models.ModelConfig(patch_size=7, d_model=20, n_layers=1, d_state=4)


def _teacher(config, data=DATA):
  fields = provenance.stage_fields(
      data=data,
      model=models.ModelConfig(),
      sections=provenance.config_sections(config, "teacher"),
      steps=600,
      seed=0,
  )
  return provenance.stage_fingerprint(fields)


def _student(config, teacher_fp, data=DATA, steps=1800):
  fields = provenance.stage_fields(
      data=data,
      model=MODEL,
      sections=provenance.config_sections(config, "student", "pkd"),
      steps=steps,
      seed=1000,
      frozen={"teacher": teacher_fp},
  )
  return provenance.stage_fingerprint(fields)


def test_hash_is_sha256_of_the_canonical_json_and_stable_across_dict_order():
  a = provenance.stage_fingerprint({"b": {"y": 1, "x": (1, 2)}, "a": 0.5, "frozen": {}})
  b = provenance.stage_fingerprint({"a": 0.5, "frozen": {}, "b": {"x": [1, 2], "y": 1}})
  assert a == b
  text = '{"a":0.5,"b":{"x":[1,2],"y":1},"frozen":{}}'  # written out by hand
  assert a["hash"] == hashlib.sha256(text.encode()).hexdigest()
  assert json.loads(json.dumps(a)) == a  # JSON-able


def test_numpy_scalars_fingerprint_like_python_numbers():
  a = provenance.stage_fingerprint({"steps": np.int64(7), "lr": np.float32(0.5), "ok": np.bool_(1)})
  b = provenance.stage_fingerprint({"steps": 7, "lr": 0.5, "ok": True})
  assert a["hash"] == b["hash"]


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("student.epochs", 5, "student.epochs: 2 -> 5"),
        ("student.learning_rate", 1e-3, "student.learning_rate: 0.005 -> 0.001"),
        ("student.augment", "none", 'student.augment: "affine" -> "none"'),
        ("pkd.alpha", 0.9, "pkd.alpha: 0.5 -> 0.9"),
        ("pkd.loss", "bdistil", 'pkd.loss: "kd" -> "bdistil"'),
    ],
)
def test_a_config_change_changes_the_hash_and_is_named(path, value, expected):
  old_config, new_config = _config(), _config()
  section, field = path.split(".")
  new_config[section][field] = value
  t = _teacher(old_config)
  old, new = _student(old_config, t), _student(new_config, t)
  assert old["hash"] != new["hash"]
  assert provenance.diff_fingerprints(old, new) == [expected]


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(data={**DATA, "seed": 1}), "data.seed: 0 -> 1"),
        (dict(data={**DATA, "num_train": 3000}), "data.num_train: 3600 -> 3000"),
        (dict(data={**DATA, "num_heldout": 500}), "data.num_heldout: 400 -> 500"),
        (dict(data={**DATA, "num_test": 10}), "data.num_test: 1000 -> 10"),
        (dict(data={**DATA, "dataset": "synthetic"}), 'data.dataset: "mnist5k" -> "synthetic"'),
        (dict(steps=900), "steps: 1800 -> 900"),
    ],
)
def test_data_and_steps_changes_are_named(change, expected):
  t = _teacher(_config())
  old = _student(_config(), t)
  new = _student(_config(), t, **change)
  assert old["hash"] != new["hash"]
  assert provenance.diff_fingerprints(old, new) == [expected]


def test_model_change_is_named_and_scan_method_is_not_a_change():
  base = dict(data=DATA, sections={}, steps=1, seed=0)
  old = provenance.stage_fingerprint(provenance.stage_fields(model=MODEL, **base))
  new = provenance.stage_fingerprint(
      provenance.stage_fields(model=MODEL.replace(d_state=8), **base)
  )
  assert provenance.diff_fingerprints(old, new) == ["model.d_state: 4 -> 8"]
  same = provenance.stage_fingerprint(
      provenance.stage_fields(model=MODEL.replace(scan_method="sequential"), **base)
  )
  assert same["hash"] == old["hash"]


def test_settings_that_do_not_change_learning_are_left_out():
  c = _config()
  c.student.log_every = 1
  c2 = _config()
  c2.student.log_every = 99
  assert provenance.config_sections(c, "student") == provenance.config_sections(c2, "student")


def test_frozen_model_fingerprints_propagate_downstream():
  config = _config()
  t_old = _teacher(config)
  changed = _config()
  changed.teacher.epochs = 30
  t_new = _teacher(changed)
  assert provenance.diff_fingerprints(t_old, t_new) == ["teacher.epochs: 20 -> 30"]
  # The students' own config is the same, but they learned from another teacher.
  s1_old, s1_new = _student(config, t_old), _student(config, t_new)
  assert s1_old["hash"] != s1_new["hash"]
  assert provenance.diff_fingerprints(s1_old, s1_new) == [
      f"frozen.teacher: {t_old['hash'][:12]} -> {t_new['hash'][:12]}"
  ]

  # ... and a stage after them, which learned from student 1, differs as well.
  def s2(s1):
    fields = provenance.stage_fields(
        data=DATA,
        model=MODEL,
        sections=provenance.config_sections(config, "student", "pkd"),
        steps=1800,
        seed=2000,
        frozen={"teacher": t_old["hash"], "student_1": s1},
    )
    return provenance.stage_fingerprint(fields)

  assert s2(s1_old)["hash"] != s2(s1_new)["hash"]
  assert provenance.diff_fingerprints(s2(s1_old), s2(s1_new)) == [
      f"frozen.student_1: {s1_old['hash'][:12]} -> {s1_new['hash'][:12]}"
  ]
  assert s2(s1_old)["fields"]["frozen"]["student_1"] == s1_old["hash"]  # hash recorded


def test_absent_fields_and_several_differences():
  old = {"student": {"epochs": 2}, "pkd": {"alpha": 0.5}}
  new = {"student": {"epochs": 5}, "pkd": {"alpha": 0.9, "gamma": 0.1}}
  assert provenance.diff_fingerprints(old, new) == [
      "pkd.alpha: 0.5 -> 0.9",
      "pkd.gamma: (absent) -> 0.1",
      "student.epochs: 2 -> 5",
  ]
  assert provenance.diff_fingerprints(old, old) == []


def test_changed_stage_message_is_the_documented_line():
  diffs = provenance.diff_fingerprints(
      {"student": {"epochs": 2}, "pkd": {"alpha": 0.5}},
      {"student": {"epochs": 5}, "pkd": {"alpha": 0.9}},
  )
  assert provenance.changed_stage_message("student_1", diffs) == (
      "stage student_1 was trained with a different config (pkd.alpha: 0.5 -> 0.9, "
      "student.epochs: 2 -> 5); use a new --workdir, or pass --retrain_changed to retrain "
      "the changed stages and those after them"
  )
  long = provenance.changed_stage_message("s", [f"f{i}: 0 -> 1" for i in range(11)], limit=8)
  assert long.count(" -> ") == 8 and "and 3 more" in long and "\n" not in long


def test_check_stage():
  t = _teacher(_config())
  changed = _config()
  changed.student.epochs = 5
  old, new = _student(_config(), t), _student(changed, t)
  assert provenance.check_stage("student_1", None, new)  # no record: trusted as before
  assert provenance.check_stage("student_1", old, old)
  assert provenance.check_stage("student_1", old, new, retrain_changed=True) is False
  with pytest.raises(provenance.ChangedStageError) as info:
    provenance.check_stage("student_1", old, new)
  assert isinstance(info.value, ValueError)  # main prints it as one 'error:' line, exit 2
  assert "(student.epochs: 2 -> 5)" in str(info.value)


def test_npz_identity_includes_the_file_hash(tmp_path):
  path = tmp_path / "d.npz"
  path.write_bytes(b"first")
  ident = provenance.data_identity(f"npz:{path}", seed=0, num_train=1, num_heldout=0, num_test=1)
  assert ident["sha256"] == hashlib.sha256(b"first").hexdigest()
  path.write_bytes(b"second")
  ident2 = provenance.data_identity(f"npz:{path}", seed=0, num_train=1, num_heldout=0, num_test=1)
  assert provenance.diff_fingerprints({"data": ident}, {"data": ident2}) == [
      f"data.sha256: {ident['sha256'][:12]} -> {ident2['sha256'][:12]}"
  ]
  assert "sha256" not in provenance.data_identity(
      "mnist5k", seed=0, num_train=1, num_heldout=0, num_test=1
  )


def test_fingerprint_file_round_trip(tmp_path):
  assert provenance.read_fingerprint(tmp_path) is None
  fp = _teacher(_config())
  provenance.write_fingerprint(tmp_path / "ckpt" / "teacher", fp)
  assert provenance.read_fingerprint(tmp_path / "ckpt" / "teacher") == fp
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "fingerprint.json").write_text("{")
  with pytest.raises(ValueError, match="fingerprint.json is not valid JSON"):
    provenance.read_fingerprint(tmp_path / "bad")


def test_config_history_appends_one_line_per_run(tmp_path):
  t0 = datetime.datetime(2026, 12, 2, 5, 0, 0, tzinfo=datetime.timezone.utc)
  c = _config()
  c.pkd.ladder = ("s1", "s2")
  provenance.append_config_history(tmp_path, c, now=t0)
  c.student.epochs = 5
  provenance.append_config_history(tmp_path, c, now=t0 + datetime.timedelta(hours=1))
  lines = (tmp_path / "config_history.jsonl").read_text().splitlines()
  assert len(lines) == 2
  records = provenance.read_config_history(tmp_path)
  assert [r["time"] for r in records] == ["2026-12-02T05:00:00Z", "2026-12-02T06:00:00Z"]
  assert [r["config"]["student"]["epochs"] for r in records] == [2, 5]
  assert records[0]["config"]["pkd"]["ladder"] == ["s1", "s2"]


def test_config_history_undo_restores_the_file(tmp_path):
  first = provenance.append_config_history(tmp_path, {"a": 1})
  assert first.size_before is None
  text = (tmp_path / "config_history.jsonl").read_text()
  second = provenance.append_config_history(tmp_path, {"a": 2})
  assert second.ckpt_unchanged()
  second.undo()
  assert (tmp_path / "config_history.jsonl").read_text() == text
  (tmp_path / "ckpt" / "teacher").mkdir(parents=True)
  assert not first.ckpt_unchanged()
  first.undo()
  assert not (tmp_path / "config_history.jsonl").exists()
