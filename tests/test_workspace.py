"""What a config resolves to: data from each source kind, done-markers, models."""
import json
import os

import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax import config as config_lib
from first_jax.engine import modelio, workspace
from first_jax.engine.job import Job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def test_hf_local_jsonl_source_with_a_field_mapping(tmp_path):
  rng = np.random.default_rng()
  words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
  path = tmp_path / "qa.jsonl"
  with open(path, "w") as f:
    for i in range(60):
      opts = [str(w) for w in rng.choice(words, 3, replace=False)]
      f.write(json.dumps({"q": f"Question {i}: pick {opts[1]}?", "opts": opts, "gold": 1}) + "\n")
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={tmp_path / 'wd'}",
                         "--config.data.source=hf", f"--config.data.task={path}",
                         "--config.data.hf_fields.input=q", "--config.data.hf_fields.choices=opts",
                         "--config.data.hf_fields.label=gold"])
  d = Job(cfg).data
  sizes = {k: len(v["input_ids"]) for k, v in d.splits.items()}
  assert sum(sizes.values()) == 60 and min(sizes.values()) > 0
  assert d.num_choices == 3 and all((v["label"] == 1).all() for v in d.splits.values())
  with open(tmp_path / "wd" / "data" / "split.json") as f:
    record = json.load(f)
  ids = [set(record["splits"][k]["indices"]) for k in ("train", "validation", "test")]
  assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
  assert record["fingerprint"] == d.fingerprint


def test_missing_local_data_file_is_a_config_error(tmp_path):
  with pytest.raises(UserError, match="config.data.task: expected an existing data file"):
    config_lib.load(["--config", SMOKE, "--config.data.source=hf",
                     f"--config.data.task={tmp_path / 'nope.jsonl'}"])


def test_done_markers_follow_the_fingerprint(tmp_path):
  fp = workspace.fingerprint({"a": 1}, 2)
  assert fp != workspace.fingerprint({"a": 2}, 2)
  assert not workspace.is_done(str(tmp_path), fp)
  workspace.mark_done(str(tmp_path), fp)
  assert workspace.is_done(str(tmp_path), fp)
  assert not workspace.is_done(str(tmp_path), workspace.fingerprint({"a": 1}, 3))


def test_a_run_of_another_config_is_moved_aside_not_resumed(tmp_path):
  run = str(tmp_path / "students" / "first")
  workspace.start_run(run, "aaa")
  os.makedirs(os.path.join(run, "checkpoints", "10"))
  workspace.start_run(run, "aaa")  # same config: kept, it will resume
  assert os.path.exists(os.path.join(run, "checkpoints", "10"))
  workspace.start_run(run, "bbb")  # another config: its checkpoints must not be resumed
  assert not os.path.exists(os.path.join(run, "checkpoints"))
  assert os.path.exists(os.path.join(run + ".stale-aaa", "checkpoints", "10"))
  with open(os.path.join(run, "run.json")) as f:
    assert json.load(f)["fingerprint"] == "bbb"


def test_a_model_with_non_finite_parameters_is_never_exported(tmp_path):
  import jax
  from first_jax import models
  from tests.test_step import tiny
  model = tiny(0)
  leaves, tree = jax.tree.flatten(model.params)
  leaves[1] = leaves[1].at[0].set(float("inf"))
  bad = models.Model(model.config, jax.tree.unflatten(tree, leaves))
  path = str(tmp_path / "export")
  with pytest.raises(UserError, match="not exported, non-finite parameters"):
    modelio.export(bad, None, path)
  assert not os.path.exists(path)
