"""Every bad input is one line and exit 2, with nothing written: a table over config, data,
model, store, checkpoint, output path and concurrency faults, each run through the stage's
command-line entry (`cli.stage_main`, in this process) and checked for: exit code 2, exactly one
`error:` line naming the culprit, no traceback, and every file under the case's folder unchanged
(bytes and modification time), the workdir included."""
import collections
import fcntl
import json
import logging
import os
import shutil
import stat
import sys

import pytest

from first_jax.data import store
from first_jax import cli
from first_jax.stages import evaluate, pipeline, train
from tests.test_config import BAD_VALUES, SMOKE

STAGES = {"pipeline": pipeline.run, "train": train.run, "evaluate": evaluate.run}


@pytest.fixture(autouse=True)
def log_to_this_tests_stderr(capsys):
  """Log handlers keep the stderr of their creation (ours: `log.setup`'s first call; datasets'
  own): pointed at this case's captured stderr, not an earlier case's closed one."""
  loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                     if isinstance(lg, logging.Logger)]
  for lg in loggers:
    for h in lg.handlers:
      h = getattr(h, "_python_handler", h)  # absl's handler wraps a StreamHandler
      if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
        h.stream = _CURRENT_STDERR  # (setStream would flush the closed one)
  yield


class _CurrentStderr:
  def write(self, text):
    return sys.stderr.write(text)

  def flush(self):
    sys.stderr.flush()


_CURRENT_STDERR = _CurrentStderr()


def snapshot(root) -> dict:
  """relative path -> (size, mtime_ns, bytes) of every file, and every folder, under root; an
  existing workdir's `.lock` is left out (it names the latest run that held it)."""
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for d in dirs:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
    for f in files:
      p = os.path.join(dirpath, f)
      if f == ".lock" and len(os.listdir(dirpath)) > 1:
        continue
      st = os.lstat(p)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, fh.read())
  return out


def expect_one_line(capsys, tmp_path, stage: str, args: list, needle: str) -> str:
  before = snapshot(tmp_path)
  code = cli.stage_main(STAGES[stage], ["--config", SMOKE] + list(args))
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 2, err
  assert len(errors) == 1 and needle in errors[0], err
  assert "Traceback" not in err, err
  after = snapshot(tmp_path)
  assert after == before, sorted(set(after) ^ set(before)) or "contents changed"
  return errors[0]


# ------------------------------------------------------------------ config values (start-up)


@pytest.mark.parametrize("args, needle", BAD_VALUES)
def test_bad_config_values(capsys, tmp_path, args, needle):
  expect_one_line(capsys, tmp_path, "pipeline", [f"--config.workdir={tmp_path}/wd"] + args,
                  needle)


# ------------------------------------------------------------------ config files and the CLI

CONFIG_FILES = {
    "syntax error": ("def get_config(:\n", "line 1"),
    "get_config raises": ("def get_config(arg=''):\n  raise ValueError('no such preset')\n",
                          "no such preset"),
    "no get_config": ("X = 1\n", "get_config"),
    "returns a dict": ("def get_config(arg=''):\n  return {'a': 1}\n", "ConfigDict"),
    "imports a missing module": ("import no_such_module_xyz\n", "no_such_module_xyz"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_bad_config_files_name_the_file(capsys, tmp_path, name):
  text, needle = CONFIG_FILES[name]
  path = tmp_path / "cfg.py"
  path.write_text(text)
  before = snapshot(tmp_path)
  code = cli.stage_main(pipeline.run, ["--config", str(path)])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 2 and len(errors) == 1, err
  assert str(path) in errors[0] and needle in errors[0], errors[0]
  assert "Traceback" not in err and snapshot(tmp_path) == before


@pytest.mark.parametrize("args, needle", [
    ([], "--config: required"),
    (["--config"], "--config"),
    (["--config", "/no/such/config.py"], "/no/such/config.py: file not found"),
    (["--config", SMOKE, "--config.extract.k"], "config.extract.k"),
    (["--config", SMOKE, "--not-a-flag"], "--not-a-flag"),
    (["--config", SMOKE, "--config.students=sft,bogus"], "bogus"),
    (["--config", SMOKE, "--config.students=sft@0"], "sft@0"),
    # sampled targets: a full-vocabulary temperature is log_space's, fixed before the draw, and
    # the estimate is of the forward KL
    (["--config", SMOKE, "--config.students=sft,first-sampled"], "distill.temperature_mode"),
    (["--config", SMOKE, "--config.students=kd-sampled-renormalize"], "kd-sampled-renormalize"),
    (["--config", SMOKE, "--config.students=kd-sampled", "--config.distill.direction=reverse"],
     "distill.direction=forward"),
    (["--config", SMOKE, "--config.students=first-sampled-log_space",
      "--config.distill.mode=online", "--config.distill.temperature=search"],
     "distill.temperature"),
])
def test_bad_command_lines(capsys, tmp_path, monkeypatch, args, needle):
  monkeypatch.chdir(tmp_path)
  before = snapshot(tmp_path)
  code = cli.stage_main(pipeline.run, args + ([f"--config.workdir={tmp_path}/wd"]
                                              if SMOKE in args else []))
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 2 and len(errors) == 1 and needle in errors[0], err
  assert "Traceback" not in err and snapshot(tmp_path) == before


# ------------------------------------------------------------------ data


def _jsonl(tmp_path, name: str, content: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


GOOD_ROW = {"question": "Which is a color?", "choices": ["red", "dog"], "answer": 0}
DATA = {
    "empty file": (b"", "empty file"),
    "no rows": (b"\n", "rows.jsonl"),
    "not UTF-8": (b'{"question": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n', "UTF-8"),
    "not JSON": (b'{"question": oops}\n', "rows.jsonl"),
    "missing column": (json.dumps({"question": "q", "answer": 0}).encode() + b"\n", "choices"),
    "label out of range": (json.dumps({**GOOD_ROW, "answer": 7}).encode() + b"\n", "row 0"),
    "one choice": (json.dumps({**GOOD_ROW, "choices": ["red"]}).encode() + b"\n", "row 0"),
}


@pytest.mark.parametrize("name", sorted(DATA))
def test_bad_data_files(capsys, tmp_path, name):
  content, needle = DATA[name]
  path = _jsonl(tmp_path, "rows.jsonl", content)
  line = expect_one_line(capsys, tmp_path, "pipeline", [
      f"--config.workdir={tmp_path}/wd", "--config.data.source=hf",
      f"--config.data.task={path}"], needle)
  assert "rows.jsonl" in line or "data." in line, line


@pytest.mark.parametrize("args, needle", [
    (["--config.data.source=hf", "--config.data.task=/no/such/rows.jsonl"], "/no/such/rows.jsonl"),
    (["--config.data.source=hf", "--config.data.task=rows.txt"], "rows.txt"),
    (["--config.data.source=bigbench", "--config.data.task=no such task!"], "no such task!"),
    (["--config.data.source=nowhere"], "config.data.source"),
    (["--config.data.source=vader", "--config.data.task=films"], "data.task 'films'"),
    (["--config.data.source=vader", "--config.data.task=tweets",
      "--config.data.neutral_band=-0.5"], "data.neutral_band"),
    (["--config.data.source=evals", "--config.data.task=../secret.jsonl"], "evals task"),
    (["--config.data.kind=prose"], "config.data.kind"),
    (["--config.data.synthetic_size=3"], "split"),
    (["--config.finetune.batch_size=100000"], "config.finetune.batch_size"),
    (["--config.distill.batch_size=100000"], "config.distill.batch_size"),
    (["--config.data.validation=0.7", "--config.data.test=0.5"], "config.data"),
    (["--config.data.max_len=2"], "data.max_len"),
    (["--config.data.kind=text", "--config.data.answer_template=no field"],
     "data.answer_template"),
])
def test_bad_data_settings(capsys, tmp_path, args, needle):
  expect_one_line(capsys, tmp_path, "pipeline", [f"--config.workdir={tmp_path}/wd"] + args,
                  needle)


TASK = {"examples": [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0),
                                                                   "no": int(i % 2 == 1)}}
                     for i in range(40)]}
BIGBENCH = {  # name: (task.json bytes, out-of-domain task, what the line names)
    "task.json not JSON": (b"{oops", None, "task.json"),
    "no examples list": (json.dumps({"name": "x"}).encode(), None, "examples"),
    "empty examples": (json.dumps({"examples": []}).encode(), None, "task.json"),
    "out-of-domain task missing": (json.dumps(TASK).encode(), "missing/task.json",
                                   "missing/task.json"),
}


@pytest.mark.parametrize("name", sorted(BIGBENCH))
def test_bad_bigbench_tasks(capsys, tmp_path, name):
  content, ood, needle = BIGBENCH[name]
  (tmp_path / "task.json").write_bytes(content)
  args = [f"--config.workdir={tmp_path}/wd", "--config.data.source=bigbench",
          f"--config.data.task={tmp_path}/task.json", "--config.data.synthetic_size=40"]
  if ood:
    args.append(f"--config.data.ood_tasks={tmp_path}/{ood}")
  expect_one_line(capsys, tmp_path, "pipeline", args, needle)


# ------------------------------------------------------------------ models and tokenizers


def _model_dir(tmp_path, files: dict) -> str:
  path = tmp_path / "model"
  path.mkdir()
  for name, content in files.items():
    (path / name).write_bytes(content)
  return str(path)


@pytest.mark.parametrize("files, needle", [
    ({}, "config.json"),
    ({"config.json": b"{not json"}, "config.json"),
    ({"config.json": json.dumps({"model_type": "llama"}).encode()}, "model"),
    ({"model.gguf": b"GGUF garbage"}, "model.gguf"),
])
def test_bad_teacher_models(capsys, tmp_path, files, needle):
  path = _model_dir(tmp_path, files)
  if list(files) == ["model.gguf"]:
    path = os.path.join(path, "model.gguf")
  expect_one_line(capsys, tmp_path, "pipeline", [
      f"--config.workdir={tmp_path}/wd", "--config.teacher.init=pretrained",
      f"--config.teacher.path={path}"], needle)


@pytest.mark.parametrize("content, name", [
    (b"not a tokenizer", "tokenizer.json"),
    (b"\x00\x01\x02", "tok.gguf"),
])
def test_bad_tokenizer_files(capsys, tmp_path, content, name):
  path = tmp_path / name
  path.write_bytes(content)
  expect_one_line(capsys, tmp_path, "pipeline", [
      f"--config.workdir={tmp_path}/wd", f"--config.tokenizer={path}"], name)


def test_an_extra_evaluation_model_that_is_missing(capsys, tmp_path):
  expect_one_line(capsys, tmp_path, "pipeline", [
      f"--config.workdir={tmp_path}/wd", f"--config.evaluate.models={tmp_path}/nope"],
      "config.evaluate.models")


# ------------------------------------------------------------------ output paths, concurrency


def test_a_workdir_that_is_a_file(capsys, tmp_path):
  (tmp_path / "wd").write_text("x")
  expect_one_line(capsys, tmp_path, "pipeline", [f"--config.workdir={tmp_path}/wd"],
                  "config.workdir")


def test_a_workdir_under_a_file(capsys, tmp_path):
  (tmp_path / "f").write_text("x")
  expect_one_line(capsys, tmp_path, "pipeline", [f"--config.workdir={tmp_path}/f/wd"],
                  "config.workdir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_workdir_parent(capsys, tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    expect_one_line(capsys, tmp_path, "pipeline", [f"--config.workdir={ro}/wd"],
                    "config.workdir")
  finally:
    ro.chmod(stat.S_IRWXU)


def test_a_workdir_in_use(capsys, tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  with open(wd / ".lock", "a+") as f:  # the lock file workspace.lock takes
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    expect_one_line(capsys, tmp_path, "pipeline", [f"--config.workdir={wd}"], "in use")


# ------------------------------------------------------------------ stores, markers, checkpoints


@pytest.fixture(scope="module")
def finished(smoke_workdir):  # tests/conftest.py: a finished smoke run; each case damages a copy
  return smoke_workdir


def _copy(finished, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(finished, wd)
  return wd


def _manifest(wd) -> dict:
  with open(wd / "store" / store.MANIFEST) as f:
    return json.load(f)


def _write_manifest(wd, m: dict) -> None:
  (wd / "store" / store.MANIFEST).write_text(json.dumps(m))


Damage = collections.namedtuple("Damage", "stage apply needle")
DAMAGES = {
    "store manifest not JSON": Damage(
        "train", lambda wd: (wd / "store" / store.MANIFEST).write_text("{oops"),
        "manifest.json"),
    "store manifest with another k": Damage(
        "train", lambda wd: _write_manifest(wd, {**_manifest(wd), "k": 3}), "store"),
    "store manifest incomplete": Damage(
        "train", lambda wd: _write_manifest(wd, {**_manifest(wd), "complete": False}), "store"),
    "store shard truncated": Damage(
        "train", lambda wd: _truncate(wd / "store", ".bin"), "store"),
    "store shard missing": Damage(
        "train", lambda wd: _remove_one(wd / "store", ".bin"), "store"),
    "store missing": Damage("train", lambda wd: shutil.rmtree(wd / "store"), "store"),
    "calibration missing": Damage(
        "train", lambda wd: _write_manifest(
            wd, {k: v for k, v in _manifest(wd).items() if k != "calibration"}), "calibrat"),
    "teacher export weights truncated (evaluate alone, its scores not cached)": Damage(
        "evaluate", lambda wd: (_truncate(wd / "teacher" / "export", ".safetensors"),
                                os.remove(wd / "eval" / "scores" / "teacher.npz"),
                                os.remove(wd / "eval" / "done.json")), "safetensors"),
}
# (a garbled done.json is not an error: the run counts as not done, with one warning naming
# the file; tests/test_checkpoint_recovery.py::test_a_damaged_done_marker_is_not_done_...)


def _files(folder, suffix):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                if f.endswith(suffix))


def _truncate(folder, suffix):
  path = _files(folder, suffix)[0]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove_one(folder, suffix):
  os.remove(_files(folder, suffix)[0])


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_damaged_outputs_of_earlier_stages(capsys, tmp_path, finished, name):
  damage = DAMAGES[name]
  wd = _copy(finished, tmp_path)
  damage.apply(wd)
  students = "sft,first" if damage.stage == "evaluate" else "first"
  # train a student that is not done yet, so that the store is read
  args = [f"--config.workdir={wd}", f"--config.students={students}"]
  if damage.stage == "train":
    args.append("--config.distill.epochs=3")
  expect_one_line(capsys, tmp_path, damage.stage, args, damage.needle)


# ------------------------------------------------------------------ a served teacher (start-up)

SERVED = {  # name: (loopback api, its fault, extra flags, what the one line names)
    "unreachable": ("llama_cpp", "stopped", [], "teacher.server.url: http://127.0.0.1:"),
    "unknown model": ("llama_cpp", None, ["--config.teacher.server.model=other"],
                      "config.teacher.server.model: 'other' is not served"),
    "k above the limit": ("vllm", "max_logprobs=4", [],
                          "config.extract.k: the server refused 20 log-probs"),
    "another tokenizer": ("llama_cpp", "tokenize_shift", [],
                          "config.tokenizer: the served model tokenizes differently"),
}


@pytest.mark.parametrize("name", sorted(SERVED))
def test_served_teacher_startup_checks(capsys, tmp_path, name):
  """A served teacher is checked before anything is written: reachable, the model served, the
  top-k allowed, the same tokenizer (each against the loopback server, through the CLI)."""
  from first_jax.data import tokenizer as tokenizer_lib
  from tests.served_loopback import Loopback
  from tests.test_served import random_scorer
  api, fault, extra, needle = SERVED[name]
  tok = tokenizer_lib.load("gpt2")
  lb = Loopback(random_scorer(0, len(tok)), tok, api, model="m",
                max_logprobs=4 if fault == "max_logprobs=4" else 20)
  lb.tokenize_shift = int(fault == "tokenize_shift")
  with lb:
    url = lb.url
    if fault == "stopped":
      lb.stop()
    expect_one_line(capsys, tmp_path, "pipeline", [
        f"--config.workdir={tmp_path}/wd", "--config.teacher.source=server",
        f"--config.teacher.server.url={url}", "--config.teacher.server.model=m",
        f"--config.teacher.server.api={api}", "--config.teacher.server.retries=1",
        "--config.teacher.server.backoff_s=0.01"] + extra, needle)
