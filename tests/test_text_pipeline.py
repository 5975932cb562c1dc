"""Prompt/response text through every stage (configs/smoke.py:text)."""
import json
import os

import numpy as np
import pytest

from first_jax.data import store
from first_jax import cli, config as config_lib
from first_jax.engine.job import Job
from first_jax.stages import pipeline

# Slow (the default suite's 10-minute budget): text data through every stage (~4 min).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_TEXT = os.path.join(ROOT, "configs", "smoke.py") + ":text"


def _choice_task(path):
  """A tiny BIG-bench-style multiple-choice task.json (evaluated beside the text data)."""
  rng = np.random.default_rng(0)
  words = {"an animal": ["dog", "cat"], "a color": ["red", "blue"], "a fruit": ["apple", "lemon"]}
  examples = []
  for i in range(12):
    kinds = list(rng.permutation(list(words)))
    q = kinds[0]
    examples.append({"input": f"Which one is {q}?",
                     "target_scores": {words[k][i % 2]: int(k == q) for k in kinds}})
  with open(path, "w") as f:
    json.dump({"name": "tiny_choice", "examples": examples}, f)
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("smoke_text"))
  task = _choice_task(os.path.join(wd, "tiny_choice.json"))
  args = ["--config", SMOKE_TEXT, f"--config.workdir={wd}",
          f"--config.evaluate.choice_tasks=('{task}',)"]
  assert cli.stage_main(pipeline.run, args) == 0
  return wd, args


def test_store_keeps_every_response_token_and_only_those(workdir):
  wd, args = workdir
  cfg = config_lib.load(args)
  data = Job(cfg).data
  train = data.splits["train"]
  reader = store.StoreReader(os.path.join(wd, "store"))
  scored_N = (train["loss_mask"] > 0).sum(-1)
  assert scored_N.min() > 1  # more than one position per example
  assert reader.spec.positions == scored_N.max() < reader.spec.seq_len
  rec = reader.read(train["example_id"])
  np.testing.assert_array_equal(rec["mask_NxL"], train["loss_mask"] > 0)
  np.testing.assert_array_equal(rec["token_hash_N"], store.token_hash(train["input_ids"]))


def test_calibration_counts_token_events(workdir):
  wd, args = workdir
  cfg = config_lib.load(args)
  val = Job(cfg).data.splits["validation"]
  calib = store.StoreReader(os.path.join(wd, "store"), verify=False).calibration
  assert calib["scoring"] == "tokens"
  assert calib["num_events"] == int((val["loss_mask"] > 0).sum()) > len(val["input_ids"])


def test_results_hold_token_level_metrics_per_split(workdir):
  wd, _ = workdir
  with open(os.path.join(wd, "eval", "results.json")) as f:
    doc = json.load(f)
  assert doc["kind"] == "text" and doc["scoring"] == "tokens"
  results = doc["results"]
  for name in ("teacher", "sft", "kd", "first", "sft+ts", "first+ts"):
    r = results[name]["in_domain"]
    assert r["n"] > r["rows"] > 0, name
    for key in ("nll", "ece", "accuracy", "mce", "brier", "perplexity"):
      assert np.isfinite(r[key]), (name, key)
    assert np.isclose(r["perplexity"], np.exp(r["nll"]))
    c = results[name][next(s for s in results[name] if s.startswith("choice:"))]
    assert c["n"] == 12 and 0 <= c["accuracy"] <= 1 and c["scoring"] == "choice log-likelihood"
  # the post-hoc row is the same model at the grid temperature of lowest validation NLL
  assert results["first+ts"]["in_domain"]["accuracy"] == results["first"]["in_domain"]["accuracy"]
  with open(os.path.join(wd, "eval", "events.json")) as f:
    ev = json.load(f)["events"]["first"]["in_domain"]
  assert len(ev["confidence"]) == len(ev["row"]) == results["first"]["in_domain"]["n"]


def test_text_only_config_mistakes_are_refused_at_start(tmp_path, capsys):
  for override, key in (("--config.students=('sft','sft_ls-choices')", "config.students"),
                        ("--config.data.loss_on=all", "config.data.loss_on"),
                        ("--config.data.answer_template=x", "config.data.answer_template")):
    args = ["--config", SMOKE_TEXT, f"--config.workdir={tmp_path}", override]
    assert cli.stage_main(pipeline.run, args) == 2
    assert key in capsys.readouterr().err


def test_online_search_runs_on_response_token_events(workdir, tmp_path):
  """distill.mode=online with the in-step search: the buffer fills with response-token events
  (every scored position), and the searched temperature moves away from its start."""
  import shutil
  from first_jax.stages import train
  wd, args = workdir
  copy = str(tmp_path / "wd")
  shutil.copytree(wd, copy)
  args = [a for a in args if not a.startswith("--config.workdir=")] + [
      f"--config.workdir={copy}", "--config.distill.mode=online",
      "--config.distill.temperature=search", "--config.students=first",
      "--config.distill.search_min_events=16", "--config.log_every_steps=1"]
  cfg = config_lib.load(args)
  train.run(Job(cfg))
  with open(os.path.join(copy, "students", "first", "metrics.jsonl")) as f:
    temps = [json.loads(line)["train/first/temperature"] for line in f]
  assert all(t > 0 for t in temps)
  assert len(set(round(t, 6) for t in temps)) > 1  # searched in the step, not a constant
