"""Damaged checkpoints and markers, low disk: a resume falls back to the newest whole step and
ends bit-identical to an unbroken run; damaged markers and a full disk are one line, never a
traceback."""
import glob
import json
import logging
import os
import shutil
from collections import namedtuple

import jax
import numpy as np
import pytest

from first_jax.runtime import checkpoint as ckpt_lib
from first_jax.runtime.errors import UserError
from first_jax.core import step
from first_jax.engine import workspace
from tests.test_step import tiny
from tests.test_trainer import losses_by_step, run

TOTAL = 14  # every_steps=4: checkpoints at 4, 8, 12, 14 (test_trainer.run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An unbroken run and a run killed after 10 steps (checkpoints at steps 4 and 8)."""
  root = tmp_path_factory.mktemp("runs")
  unbroken = run(str(root / "unbroken"), TOTAL)
  with pytest.raises(KeyboardInterrupt):
    run(str(root / "killed"), TOTAL, kill_after=10)
  steps = sorted(int(d) for d in os.listdir(root / "killed" / "checkpoints") if d.isdigit())
  assert steps == [4, 8], steps
  return {"params": jax.device_get(unbroken.params), "losses": losses_by_step(
      str(root / "unbroken")), "killed": str(root / "killed")}


def killed_copy(runs, tmp_path):
  folder = str(tmp_path / "run")
  shutil.copytree(runs["killed"], folder)
  return folder


def truncate_largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  path = max(files, key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


def remove_data_position(step_dir):
  os.remove(os.path.join(step_dir, "data", "metadata"))  # the JSON itself


def garbage_data_position(step_dir):
  with open(os.path.join(step_dir, "data", "metadata"), "w") as f:
    f.write('{"epoch": 1, "ind')


def impossible_data_position(step_dir):  # valid JSON, not a position of the iterator
  with open(os.path.join(step_dir, "data", "metadata"), "w") as f:
    json.dump({"epoch": 1, "index": 99}, f)


def assert_equal_to_unbroken(runs, folder, resumed):
  jax.tree.map(np.testing.assert_array_equal, runs["params"], jax.device_get(resumed.params))
  assert int(resumed.step) == TOTAL
  assert losses_by_step(folder) == runs["losses"]  # every step once, the same losses exactly


def damage_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and r.name == "first_jax.runtime.checkpoint"]


@pytest.mark.parametrize("damage, reason", [
    (truncate_largest_array_file, "Error reading"),
    pytest.param(remove_data_position, "FileNotFoundError", marks=pytest.mark.slow),
    pytest.param(garbage_data_position, "JSONDecodeError", marks=pytest.mark.slow),
    pytest.param(impossible_data_position, "not a position of this iterator",
                 marks=pytest.mark.slow),
])
def test_a_damaged_latest_step_falls_back_to_the_previous_one(runs, tmp_path, caplog, capfd,
                                                              damage, reason):
  folder = killed_copy(runs, tmp_path)
  ckpts = os.path.join(folder, "checkpoints")
  damage(os.path.join(ckpts, "8"))
  with caplog.at_level(logging.WARNING):
    resumed = run(folder, TOTAL)
  (warning,) = damage_warnings(caplog)
  (aside,) = glob.glob(os.path.join(ckpts, "8.damaged-*"))
  assert "step 8 does not restore" in warning and aside in warning and reason in warning, warning
  assert warning.endswith("trying step 4"), warning
  assert "\n" not in warning
  assert "Traceback" not in capfd.readouterr().err
  assert_equal_to_unbroken(runs, folder, resumed)  # resumed at step 4, redid 5..14
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert TOTAL in steps and 4 not in steps, steps  # later saves went on normally


def test_all_steps_damaged_starts_over_with_a_warning(runs, tmp_path, caplog, capfd):
  folder = killed_copy(runs, tmp_path)
  ckpts = os.path.join(folder, "checkpoints")
  truncate_largest_array_file(os.path.join(ckpts, "8"))
  remove_data_position(os.path.join(ckpts, "4"))
  with caplog.at_level(logging.WARNING):
    resumed = run(folder, TOTAL)
  warnings = damage_warnings(caplog)
  assert len(warnings) == 3, warnings
  assert "step 8 does not restore" in warnings[0] and warnings[0].endswith("trying step 4")
  assert "step 4 does not restore" in warnings[1] and warnings[1].endswith("no older step")
  assert "none of the 2 checkpoint steps restores" in warnings[2], warnings[2]
  assert len(glob.glob(os.path.join(ckpts, "*.damaged-*"))) == 2
  assert "Traceback" not in capfd.readouterr().err
  assert_equal_to_unbroken(runs, folder, resumed)  # from step 0, the same data order


def test_a_whole_checkpoint_of_another_train_state_is_one_line_and_not_moved(runs, tmp_path):
  folder = killed_copy(runs, tmp_path)
  model = tiny(0)
  tx = step.make_optimizer(lr=3e-3, total_steps=TOTAL, warmup_ratio=0.2, weight_decay=0.01,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(model.params, tx)
  other = state.replace(params={**state.params, "extra": np.zeros(3, np.float32)})
  ckpt = ckpt_lib.Checkpointer(os.path.join(folder, "checkpoints"))
  try:
    with pytest.raises(UserError, match=r"checkpoints/8: the checkpoint does not fit this "
                                        r"run's train state") as e:
      ckpt.restore_newest(ckpt_lib.abstract_like(other))
  finally:
    ckpt.close()
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == ["4", "8"]


def test_restore_is_bit_identical_to_what_was_saved(tmp_path):
  model = tiny(0)
  tx = step.make_optimizer(lr=3e-3, total_steps=4, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(model.params, tx)
  rng = np.random.default_rng(0)  # non-trivial optimizer moments
  state = state.replace(opt_state=jax.tree.map(
      lambda x: jax.numpy.asarray(rng.standard_normal(x.shape), x.dtype) if x.ndim else x,
      state.opt_state))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "c"))
  ckpt.save(3, state, {"epoch": 0, "index": 3})
  ckpt.close()
  os.mkdir(tmp_path / "c" / "5.damaged-1")  # a moved-aside folder is not a step
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "c"))
  restored, data, at = ckpt.restore_newest(ckpt_lib.abstract_like(state))
  ckpt.close()
  assert (data, at) == ({"epoch": 0, "index": 3}, 3)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))


# ----------------------------------------------------------------------------- markers


@pytest.mark.parametrize("text", ["{garbage", "[1, 2]", '{"no": "fingerprint"}', "\xff\xfe"])
def test_a_damaged_done_marker_is_not_done_with_a_warning(tmp_path, caplog, text):
  fp = workspace.fingerprint({"a": 1})
  marker = tmp_path / "done.json"
  marker.write_bytes(text.encode("latin-1"))
  with caplog.at_level(logging.WARNING):
    assert not workspace.is_done(str(tmp_path), fp)
    assert not workspace.is_done(str(tmp_path), fp)  # asked again: no second warning
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and str(marker) in warnings[0] and "not done" in warnings[0]
  workspace.mark_done(str(tmp_path), fp)  # the re-run's marker replaces it
  assert workspace.is_done(str(tmp_path), fp)


def test_a_damaged_run_marker_is_another_configs_run(tmp_path, caplog):
  folder = tmp_path / "students" / "first"
  os.makedirs(folder / "checkpoints" / "10")
  (folder / "run.json").write_text("{not json")
  with caplog.at_level(logging.WARNING):
    workspace.start_run(str(folder), "bbb")
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert str(folder / "run.json") in warning and "damaged" in warning, warning
  assert os.path.exists(str(folder) + ".stale-unknown/checkpoints/10")
  assert json.loads((folder / "run.json").read_text()) == {"fingerprint": "bbb"}


# ----------------------------------------------------------------------------- disk


def fake_disk(monkeypatch, free):
  usage = namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free + 1, 0, free))


def test_low_disk_before_the_first_save_is_one_line_naming_the_directory(tmp_path,
                                                                           monkeypatch):
  fake_disk(monkeypatch, 1000)
  folder = str(tmp_path / "run")
  with pytest.raises(UserError) as e:
    run(folder, 8)
  msg = str(e.value)
  ckpts = os.path.join(folder, "checkpoints")
  model = tiny(0)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
  assert msg.startswith(f"{ckpts}: not enough free disk space") and "\n" not in msg, msg
  needed = int(msg.split("needs ")[1].split(" bytes")[0])
  assert needed > 2 * state_bytes  # params and both Adam moments
  assert "1000 bytes free" in msg
  assert not [d for d in os.listdir(ckpts) if d.isdigit()]  # nothing half-written


@pytest.mark.slow
def test_low_disk_needs_the_size_of_the_last_step(runs, tmp_path, monkeypatch):
  folder = killed_copy(runs, tmp_path)
  step8 = os.path.join(folder, "checkpoints", "8")
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step8) for f in fs)
  fake_disk(monkeypatch, size - 1)
  with pytest.raises(UserError, match=rf"checkpoints: not enough free disk space for a "
                                       rf"checkpoint: needs {size} bytes \(.*, the size of step "
                                       rf"8\), {size - 1} bytes free"):
    run(folder, TOTAL)  # resumes at 8, stops before the save at 12
  assert sorted(int(d) for d in os.listdir(os.path.dirname(step8)) if d.isdigit()) == [4, 8]
  monkeypatch.undo()
  resumed = run(folder, TOTAL)  # enough space: the run finishes, equal to the unbroken one
  assert_equal_to_unbroken(runs, folder, resumed)


@pytest.mark.parametrize("policy", ckpt_lib.AFTER_DONE)
def test_after_done_keeps_what_the_policy_says(runs, tmp_path, policy):
  folder = killed_copy(runs, tmp_path)  # checkpoints at steps 4 and 8
  directory = os.path.join(folder, "checkpoints")
  sizes = {s: ckpt_lib._tree_bytes(os.path.join(directory, s)) for s in ("4", "8")}
  freed = ckpt_lib.after_done(directory, policy)
  left = sorted(os.listdir(directory)) if os.path.exists(directory) else None
  expected = {"none": (None, sizes["4"] + sizes["8"]), "last": (["8"], sizes["4"]),
              "all": (["4", "8"], 0)}[policy]
  assert (left, freed) == expected
  gone = set(os.listdir(runs["killed"])) - set(os.listdir(folder))  # nothing else touched
  assert gone == ({"checkpoints"} if policy == "none" else set())
  if policy == "last":  # the kept step still resumes: the run ends equal to the unbroken one
    params = run(folder, TOTAL).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), runs["params"])


@pytest.mark.parametrize("policy", ("none", "last"))
def test_after_done_finishes_a_pruning_a_kill_interrupted(runs, tmp_path, policy):
  folder = killed_copy(runs, tmp_path)  # checkpoints at steps 4 and 8
  directory = os.path.join(folder, "checkpoints")
  expected = ckpt_lib.after_done(os.path.join(killed_copy(runs, tmp_path / "b"), "checkpoints"),
                                 policy)
  # killed mid-removal: the step renamed aside, half of its files removed
  half = os.path.join(directory, "4.deleting-17")
  os.rename(os.path.join(directory, "4"), half)
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(half) for f in fs)
  removed = sum(os.path.getsize(p) for p in files[::2])
  for p in files[::2]:
    os.remove(p)
  freed = ckpt_lib.after_done(directory, policy)
  left = sorted(os.listdir(directory)) if os.path.exists(directory) else None
  assert (left, freed) == ({"none": None, "last": ["8"]}[policy], expected - removed)
  assert ckpt_lib.after_done(directory, policy) == 0  # idempotent
