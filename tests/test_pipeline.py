"""The smoke pipeline end to end (every stage), its outputs, skipping, and refusals."""
import json
import os
import time

import numpy as np
import pytest
import torch
import transformers

from first_jax.data import store
from first_jax import cli, config as config_lib
from first_jax.engine import workspace
from first_jax.engine.job import Job
from first_jax.stages import base, pipeline, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def done_already(cfg) -> set[str]:
  """The stages a run of `cfg` would skip (a stage counts only when every stage before it
  does): what the pipeline checks before each stage."""
  job, done = Job(cfg), set()
  for stage in pipeline.ORDER:
    if not stage.is_done(job):
      break
    done.add(stage.name)
  return done


@pytest.fixture(scope="module")
def workdir(smoke_workdir):  # tests/conftest.py: one finished smoke run, shared
  return smoke_workdir


def test_store_manifest_has_k5_and_the_calibrated_temperature(workdir):
  with open(os.path.join(workdir, "store", "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["k"] == 5
  calib = manifest["calibration"]
  assert calib["temperature"] == calib["searches"][f"{calib['mode']}-bucket"]["best_t"] > 0
  assert set(calib["searches"]) == {f"{m}-{t}" for m in ("prob_softmax", "log_space")
                                    for t in ("bucket", "renormalize")}
  for curve in calib["searches"].values():
    assert min(curve["ece"]) == pytest.approx(curve["best_ece"])
  identity = calib["searches"]["log_space-bucket"]["ece_at_identity"]
  assert identity == pytest.approx(calib["premise"]["teacher_val_ece"], abs=1e-5)
  assert calib["scoring"] == "choices" and isinstance(calib["premise"]["holds"], bool)
  assert os.path.exists(os.path.join(workdir, "store", "calibration_prob_softmax.png"))
  reader = store.StoreReader(os.path.join(workdir, "store"))
  assert reader.num_examples > 0


def test_finished_training_runs_keep_their_export_not_their_checkpoints(workdir):
  # checkpoint.after_done=none (default): the optimizer state is not kept past done
  for run in ("teacher", "students/sft", "students/kd", "students/first"):
    names = os.listdir(os.path.join(workdir, run))
    assert "done.json" in names and "export" in names and "metrics.jsonl" in names, run
    assert not any(n.startswith("checkpoints") for n in names), (run, names)


def test_exported_student_loads_in_transformers_with_the_same_logits(workdir):
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={workdir}"])
  path = os.path.join(workdir, "students", "first", "export")
  ours = Job(cfg).load_export(os.path.dirname(path))
  hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  ids = np.asarray([tok("Which one is a color?\nA) red\nB) dog\nAnswer:")["input_ids"]])
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(ids)), theirs, atol=1e-4, rtol=1e-4)


def test_results_json_has_accuracy_and_ece_per_model(workdir):
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)["results"]
  for name in ("teacher", "sft", "sft+ts", "kd", "first"):
    r = results[name]["in_domain"]
    assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["n"] > 0, name
  with open(os.path.join(workdir, "eval", "results.md")) as f:
    assert "| first |" in f.read()


def test_second_run_skips_finished_stages(workdir, caplog):
  caplog.set_level("INFO")
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={workdir}"])
  train.run(Job(cfg))
  assert sum("done already" in r.message for r in caplog.records) == len(cfg.students)


def test_rerun_keeps_the_stage_times_of_the_run_that_did_the_work(workdir):
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={workdir}"])
  assert done_already(cfg) == set(pipeline.STAGES)  # calibrate, evaluate included
  path = os.path.join(workdir, "timings.json")
  with open(path) as f:
    first = json.load(f)
  pipeline.run(Job(cfg))
  with open(path) as f:
    second = json.load(f)
  # every stage that had work is skipped and keeps its first figure (the smoke run has no
  # sampled student: its sample stage never had work to time)
  assert set(first) == set(pipeline.STAGES) - {"sample"}
  for stage in first:
    assert second[stage] == first[stage] > 0, stage
  other = config_lib.load(["--config", SMOKE, f"--config.workdir={workdir}",
                           "--config.finetune.lr=0.5"])
  assert done_already(other) == set()  # another teacher: nothing is done


def test_finished_workdir_rerun_does_no_work_and_says_so(workdir, caplog):
  caplog.set_level("INFO")
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={workdir}"])
  outputs = [os.path.join(workdir, p) for p in (
      "teacher/done.json", "store/manifest.json", "students/first/done.json",
      "eval/results.json", "eval/done.json", "eval/events.json", "data/split.json")]
  before = {p: os.stat(p).st_mtime_ns for p in outputs}
  t0 = time.time()
  result = pipeline.run(Job(cfg))
  seconds = time.time() - t0
  messages = [r.getMessage() for r in caplog.records]
  for stage in pipeline.STAGES:
    assert any(m.startswith(f"{stage}: done already") for m in messages), (stage, messages)
  assert not any(m.startswith("pipeline: ") and "done (" not in m for m in messages), messages
  assert {p: os.stat(p).st_mtime_ns for p in outputs} == before  # nothing was rewritten
  assert result["first"]["in_domain"]["n"] > 0  # the stored results, as a run returns them
  assert seconds < 30, seconds


def test_rerun_prunes_what_a_kill_after_the_done_marker_left(workdir, tmp_path, caplog):
  # a kill between a run's done.json and the pruning of its checkpoints (or during it) left
  # them, whole or half-removed; the re-run finds the runs done and finishes the pruning
  import shutil
  wd = str(tmp_path / "killed")
  shutil.copytree(workdir, wd)
  planted = ["teacher/checkpoints/40/state", "students/kd/checkpoints.deleting-17/60/state",
             "students/first/checkpoints/80.deleting-17/state"]
  for rel in planted:
    os.makedirs(os.path.dirname(os.path.join(wd, rel)))
    with open(os.path.join(wd, rel), "wb") as f:
      f.write(np.random.default_rng(0).bytes(1000))
  caplog.set_level("INFO")
  pipeline.run(Job(config_lib.load(["--config", SMOKE, f"--config.workdir={wd}"])))
  messages = [r.getMessage() for r in caplog.records]
  assert all(any(m.startswith(f"{s}: done already") for m in messages) for s in pipeline.STAGES)
  for run in ("teacher", "students/kd", "students/first"):
    assert not any(n.startswith("checkpoints") for n in os.listdir(os.path.join(wd, run))), run
  assert sum("checkpoints pruned" in m for m in messages) == 3, messages


def test_a_done_student_of_an_unfinished_train_stage_finishes_its_pruning(workdir, tmp_path,
                                                                          caplog):
  # the SIGKILL matrix's case: killed while kd's checkpoints were being removed, before the
  # next student finished; the re-run's train stage runs and skips kd, which must prune too
  import shutil
  wd = str(tmp_path / "killed")
  shutil.copytree(workdir, wd)
  half = os.path.join(wd, "students/kd/checkpoints.deleting-17/60/state")
  os.makedirs(os.path.dirname(half))
  with open(half, "wb") as f:
    f.write(np.random.default_rng(1).bytes(1000))
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={wd}"])
  kd = train.parse_variant("kd", cfg)
  caplog.set_level("INFO")
  train.train_variant(Job(cfg), kd)
  messages = [r.getMessage() for r in caplog.records]
  assert "train kd: done already" in messages, messages
  assert not any(n.startswith("checkpoints") for n in os.listdir(os.path.join(wd, "students/kd")))
  assert any("checkpoints pruned" in m for m in messages), messages


def test_an_evaluation_rerun_removes_the_temp_files_a_killed_one_left(workdir, tmp_path):
  # the SIGKILL matrix's case: killed between writing eval/events.json's temp file and its rename
  import shutil
  from first_jax.stages import evaluate
  wd = str(tmp_path / "killed")
  shutil.copytree(workdir, wd)
  os.remove(os.path.join(wd, "eval", "done.json"))  # the kill came before it
  planted = [os.path.join(wd, "eval", ".tmp-events.json-k1ll"),
             os.path.join(wd, "eval", "scores", ".tmp-first.npz-k1ll")]
  for p in planted:
    with open(p, "wb") as f:
      f.write(np.random.default_rng(2).bytes(100))
  results = evaluate.run(Job(config_lib.load(["--config", SMOKE, f"--config.workdir={wd}"])))
  assert not any(os.path.exists(p) for p in planted)
  assert results == json.load(open(os.path.join(workdir, "eval", "results.json")))["results"]
  assert os.path.exists(os.path.join(wd, "eval", "done.json"))


def test_calibrate_and_evaluate_alone_skip_when_done_and_follow_their_inputs(workdir, caplog):
  from first_jax.stages import calibrate, evaluate
  caplog.set_level("INFO")
  args = ["--config", SMOKE, f"--config.workdir={workdir}"]
  cfg = config_lib.load(args)
  calib = base.execute(calibrate.STAGE, Job(cfg))  # each alone, as its command runs it
  results = base.execute(evaluate.STAGE, Job(cfg))
  messages = [r.getMessage() for r in caplog.records]
  assert any(m.startswith("calibrate: done already") for m in messages), messages
  assert any(m.startswith("evaluate: done already") for m in messages), messages
  manifest = json.load(open(os.path.join(workdir, "store", "manifest.json")))
  assert calib == manifest["calibration"] and "fingerprint" not in calib  # block as before
  assert manifest[calibrate.FINGERPRINT] == calibrate.fingerprint(Job(cfg), manifest)
  assert results == json.load(open(os.path.join(workdir, "eval", "results.json")))["results"]
  done = json.load(open(os.path.join(workdir, "eval", "done.json")))
  assert done["models"]["first"] == workspace.done_fingerprint(
      os.path.join(workdir, "students", "first"))
  extra = os.path.join(workdir, "students", "kd", "export")
  # (key, changes the calibration, changes the evaluation): the evaluation follows the
  # calibration through the students it retrains (their done.json fingerprints)
  for key, calib_changes, eval_changes in (
      ("calibrate.num_bins=15", True, False), ("distill.tail=renormalize", True, False),
      ("evaluate.scoring=vocab", True, True), ("evaluate.num_bins=(15,)", False, True),
      ("evaluate.post_hoc=('sft',)", False, True), (f"evaluate.models=('{extra}',)", False, True)):
    other = config_lib.load(args + [f"--config.{key}"])
    assert calibrate.is_done(Job(other)) != calib_changes, key
    assert evaluate.is_done(Job(other)) != eval_changes, key
  assert calibrate.is_done(Job(cfg)) and evaluate.is_done(Job(cfg))


@pytest.mark.slow
def test_resume_false_starts_over_moving_each_stage_folder_aside(workdir, tmp_path, caplog):
  import shutil
  wd = str(tmp_path / "again")
  shutil.copytree(workdir, wd)
  caplog.set_level("INFO")
  args = ["--config", SMOKE, f"--config.workdir={wd}", "--config.students=('sft',)"]
  pipeline.run(Job(config_lib.load(args + ["--config.resume=false"])))
  moved = {}
  for r in caplog.records:
    m = r.getMessage()
    if m.startswith("resume=false: moved "):
      src, dst = m[len("resume=false: moved "):].split(";")[0].split(" to ")
      moved[os.path.relpath(src, wd)] = dst
  assert sorted(moved) == ["eval", "store", os.path.join("students", "sft"), "teacher"]
  for rel, dst in moved.items():
    assert dst.startswith(os.path.join(wd, rel) + ".old-") and os.path.isdir(dst), dst
    assert os.path.isdir(os.path.join(wd, rel))  # written again from nothing
  assert os.path.exists(os.path.join(moved["teacher"], "done.json"))  # the old run, kept
  assert not any("resuming at step" in r.getMessage() for r in caplog.records)
  assert os.path.isdir(os.path.join(wd, "students", "kd"))  # not a student of this config
  cfg = config_lib.load(args)
  assert done_already(cfg) == set(pipeline.STAGES)  # a complete run again


def test_corrupted_shard_is_refused_naming_it(workdir, tmp_path, capsys):
  import shutil
  wd = str(tmp_path / "copy")
  shutil.copytree(workdir, wd)
  shard = sorted(f for f in os.listdir(os.path.join(wd, "store")) if f.endswith(".bin"))[0]
  path = os.path.join(wd, "store", shard)
  with open(path, "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))
  shutil.rmtree(os.path.join(wd, "students", "kd"))
  code = cli.stage_main(train.run, ["--config", SMOKE, f"--config.workdir={wd}",
                                    "--config.students=('kd',)"])
  assert code == 2
  err = capsys.readouterr().err
  assert shard in err and "sha256" in err, err


def test_unknown_student_variant_is_refused_before_work(tmp_path, capsys):
  wd = tmp_path / "wd"
  code = cli.stage_main(pipeline.run, ["--config", SMOKE, f"--config.workdir={wd}",
                                       "--config.students=('sft', 'fist')"])
  assert code == 2 and not wd.exists()
  assert "'fist'" in capsys.readouterr().err


@pytest.mark.slow
def test_online_distillation_with_in_step_temperature_search(workdir, tmp_path):
  import shutil
  wd = str(tmp_path / "online")
  shutil.copytree(workdir, wd)
  cfg = config_lib.load(["--config", SMOKE + ":online", f"--config.workdir={wd}",
                         "--config.students=('first', 'full_kd')"])
  train.run(Job(cfg))
  for name in ("first", "full_kd"):
    with open(os.path.join(wd, "students", name, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    t = [r[f"train/{name}/temperature"] for r in rows]
    loss = [r[f"train/{name}/loss"] for r in rows]
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0], (name, loss)
    if name == "first":  # searched in the step on each batch, smoothed by the EMA
      assert len(set(np.round(t, 6))) > 1 and all(x > 0 for x in t)
  assert os.path.exists(os.path.join(wd, "students", "full_kd", "export", "config.json"))


def test_student_fingerprints_follow_the_teacher_and_temperature():
  a = config_lib.load(["--config", SMOKE])
  b = config_lib.load(["--config", SMOKE, "--config.finetune.lr=0.5"])  # another teacher
  for name, follows_teacher in (("sft", False), ("kd", True), ("first", True)):
    va, vb = train.parse_variant(name, a), train.parse_variant(name, b)
    same = (train.variant_fingerprint(Job(a), va, 1.0)
            == train.variant_fingerprint(Job(b), vb, 1.0))
    assert same != follows_teacher, name
  v = train.parse_variant("first", a)
  assert train.variant_fingerprint(Job(a), v, 0.5) != train.variant_fingerprint(Job(a), v, 0.6)


def test_evaluate_extra_models_by_path(workdir, tmp_path):
  from first_jax.stages import evaluate
  import shutil
  wd = str(tmp_path / "ev")
  shutil.copytree(workdir, wd)
  extra = os.path.join(wd, "students", "kd", "export")
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={wd}",
                         f"--config.evaluate.models=('{extra}',)", "--config.students=()"])
  results = evaluate.run(Job(cfg))
  assert results["export"]["in_domain"]["accuracy"] == pytest.approx(
      json.load(open(os.path.join(workdir, "eval", "results.json")))["results"]["kd"]
      ["in_domain"]["accuracy"])


def test_results_carry_both_scorings_events_and_post_hoc_rows(workdir):
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    res = json.load(f)
  assert res["scoring"] == "choices"
  results = res["results"]
  for name in ("sft+ts", "first+ts"):  # evaluate.post_hoc defaults to (sft, first)
    assert results[name]["in_domain"]["temperature"] > 0
    assert results[name]["in_domain"]["accuracy"] == results[name[:-3]]["in_domain"]["accuracy"]
  with open(os.path.join(workdir, "eval", "events.json")) as f:
    ev = json.load(f)["events"]
  for name, sets in results.items():
    for s, r in sets.items():
      assert r["scoring"] == "choices" and 0 <= r["vocab"]["accuracy"] <= 1
      conf, correct = np.asarray(ev[name][s]["confidence"]), np.asarray(ev[name][s]["correct"])
      assert len(conf) == r["n"]
      assert correct.mean() == pytest.approx(r["accuracy"])
      assert conf.mean() == pytest.approx(r["confidence"], abs=1e-5)


def test_each_first_variant_trains_with_the_search_for_its_own_mode_and_tail(workdir):
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={workdir}"])
  searches = store.StoreReader(os.path.join(workdir, "store"), verify=False).calibration[
      "searches"]
  for name, key in (("first", "prob_softmax-bucket"), ("first-renormalize",
                                                       "prob_softmax-renormalize"),
                    ("first-log_space-renormalize", "log_space-renormalize")):
    t = train.teacher_temperature(Job(cfg), train.parse_variant(name, cfg).spec)
    assert t == searches[key]["best_t"], name
  assert train.teacher_temperature(Job(cfg), train.parse_variant("kd", cfg).spec) == 1.0
  spec = train.parse_variant("sft_ls-choices", cfg).spec
  assert spec.smooth_over == "choices" and spec.label_smoothing > 0


def test_evaluate_rerun_scores_from_the_cache(workdir, tmp_path, caplog):
  from first_jax.stages import evaluate
  import shutil
  wd = str(tmp_path / "ev")
  shutil.copytree(workdir, wd)
  caplog.set_level("INFO")
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={wd}"])
  os.remove(os.path.join(wd, "eval", "done.json"))  # past the done-check, to the score cache
  again = evaluate.run(Job(cfg))
  assert sum("scores cached" in r.message for r in caplog.records) == 2 + len(cfg.students)
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    first = json.load(f)["results"]
  assert again["first"]["in_domain"]["ece"] == first["first"]["in_domain"]["ece"]


def test_premise_is_recorded_and_can_be_required(workdir, tmp_path, capsys):
  import shutil
  wd = str(tmp_path / "pr")
  shutil.copytree(workdir, wd)
  premise = store.StoreReader(os.path.join(wd, "store"), verify=False).calibration["premise"]
  holds = (premise["teacher_val_confidence"] > premise["teacher_val_accuracy"]
           and premise["t_log_space"] > 1)
  assert premise["holds"] == holds
  from first_jax.stages import calibrate
  rc = cli.run_stage("calibrate", ["--config", SMOKE, f"--config.workdir={wd}",
                                   "--config.calibrate.require_premise=true"])
  assert rc == (0 if holds else 2)
  if not holds:
    assert "calibrate.require_premise" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_epochs_chosen_on_validation(workdir, tmp_path):
  from first_jax.stages import evaluate
  import shutil
  wd = str(tmp_path / "ep")
  shutil.copytree(workdir, wd)
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={wd}",
                         "--config.students=('sft', 'sft@1')"])
  one, full = (train.parse_variant(n, cfg) for n in ("sft@1", "sft"))
  assert one.epochs == 1 and one.spec == full.spec
  job = Job(cfg)
  assert train.variant_fingerprint(job, one, 1.0) != train.variant_fingerprint(job, full, 1.0)
  train.run(Job(cfg))
  with open(os.path.join(wd, "students", "sft@1", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  with open(os.path.join(wd, "data", "split.json")) as f:
    n_train = len(json.load(f)["splits"]["train"]["indices"])
  assert max(steps) == n_train // cfg.distill.batch_size  # one epoch, not distill.epochs (2)
  results = evaluate.run(Job(cfg))
  chosen = results["sft@val"]["in_domain"]["chosen"]
  assert chosen in ("sft", "sft@1")
  assert results["sft@val"]["in_domain"]["ece"] == results[chosen]["in_domain"]["ece"]
  with pytest.raises(Exception, match="E epochs"):
    train.parse_variant("sft@0", cfg)


def test_a_second_run_on_a_locked_workdir_exits_2_naming_the_holder(tmp_path, capsys):
  wd = str(tmp_path / "locked")
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={wd}"])
  with workspace.lock(cfg.workdir):
    rc = cli.stage_main(pipeline.run, ["--config", SMOKE, f"--config.workdir={wd}"])
    assert rc == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and "in use" in err[0]
    assert os.listdir(wd) == [".lock"]  # nothing else was written
  with workspace.lock(cfg.workdir):  # released when its holder ends
    pass


def test_scoring_shortest_first_with_cut_padding_equals_full_padding(workdir):
  from first_jax.stages import evaluate
  cfg = config_lib.load(["--config", SMOKE, f"--config.workdir={workdir}"])
  job = Job(cfg)
  arrays = job.data.splits["test"]
  lengths = arrays["attention_mask"].sum(-1)
  buckets = (int(np.percentile(lengths, 30)) + 1, int(np.percentile(lengths, 70)) + 1)
  model = job.load_export(job.layout.student("first"))
  mesh = job.mesh
  fn = evaluate.scorer(model, mesh)
  full = evaluate.score(fn, model, arrays, 16, mesh)
  cut = evaluate.score(fn, model, arrays, 16, mesh, buckets)
  assert arrays["input_ids"].shape[1] > max(buckets)  # some batches really are cut
  for k in full:
    np.testing.assert_allclose(cut[k], full[k], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cut["top_ids"][:, 0], full["top_ids"][:, 0])
