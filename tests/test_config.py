"""Config loading, overrides and start-up validation; the CLI's exit code 2."""
import json
import os
import subprocess
import sys

import pytest

from first_jax.runtime.errors import UserError
from first_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def test_overrides_are_typed_by_their_default():
  cfg = config_lib.load(["--config", SMOKE, "--config.extract.k=7", "--config.distill.lr", "0.5",
                         "--config.resume=false", "--config.data.ood_tasks=('a', 'b')",
                         "--config.mesh.data=-1", "--config.workdir=/tmp/x"])
  assert cfg.extract.k == 7 and isinstance(cfg.extract.k, int)
  assert cfg.distill.lr == 0.5 and cfg.resume is False
  assert cfg.data.ood_tasks == ("a", "b") and cfg.workdir == "/tmp/x"


def test_the_command_line_is_parsed_by_config_flags():
  # absl's boolean form, an override before --config, a key set twice (the last value wins)
  cfg = config_lib.load(["--config.extract.k=7", "--config", SMOKE, "--noconfig.resume",
                         "--config.students=sft", "--config.students=kd,first"])
  assert cfg.extract.k == 7 and cfg.resume is False and cfg.students == ("kd", "first")
  with pytest.raises(UserError, match=r"^--bogus: unknown argument"):
    config_lib.load(["--config", SMOKE, "--bogus=1"])


def test_config_is_locked_after_load():
  cfg = config_lib.load(["--config", SMOKE])
  with pytest.raises((AttributeError, KeyError)):
    cfg.new_key = 1


def test_variant_argument():
  cfg = config_lib.load(["--config", SMOKE + ":online"])
  assert cfg.distill.mode == "online" and cfg.distill.temperature == "search"


BAD_VALUES = [  # (overrides, what the one error line says); also run through the CLI in
    # tests/test_bad_inputs.py (exit 2, nothing written)
    (["--config.nonexistent=1"], "config.nonexistent: unknown key"),
    (["--config.data.nope=1"], "config.data.nope: unknown key"),
    (["--config.extract.k=abc"], "config.extract.k: expected int"),
    (["--config.resume=maybe"], "config.resume: expected bool"),
    (["--config.extract.k=0"], "config.extract.k: expected an integer >= 1"),
    (["--config.extract.k=60000"], "config.extract.k: expected <= the vocabulary size"),
    (["--config.distill.lr=-1e-3"], "config.distill.lr: expected a finite positive learning rate"),
    (["--config.finetune.lr=0"], "config.finetune.lr: expected a finite positive learning rate"),
    (["--config.mesh.data=3"], "config.mesh: expected data*fsdp*tensor == 8 devices"),
    (["--config.mesh.tensor=3"], "config.mesh: expected sizes whose product divides"),
    (["--config.distill.tail=sideways"], "config.distill.tail: expected bucket or renormalize"),
    (["--config.tokenizer=/no/such/tokenizer"], "config.tokenizer: expected an existing"),
    (["--config.teacher.init=pretrained", "--config.teacher.path=/no/such.gguf"],
     "config.teacher.path: expected an existing"),
    (["--config.evaluate.scoring=letters"], "config.evaluate.scoring: expected choices or vocab"),
    (["--config.distill.search_min_events=5000"], "config.distill.search_min_events"),
    (["--config.distill.search_events=0"], "config.distill.search_events: expected an integer"),
    (["--config.distill.temperature_ema=1.5"], "config.distill.temperature_ema"),
    (["--config.distill.length_buckets=(16, 4096)"], "config.distill.length_buckets"),
    (["--config.distill.seed=-2"], "config.distill.seed"),
    (["--config.distill.temperature_mode=bogus"], "config.distill.temperature_mode: expected"),
    (["--config.distill.direction=bogus"], "config.distill.direction: expected"),
    (["--config.distill.temperature=-1"], "config.distill.temperature: expected"),
    (["--config.distill.temperature=hot"], "config.distill.temperature: expected"),
    (["--config.distill.lr=inf"], "config.distill.lr: expected a finite positive"),
    (["--config.distill.epochs=0"], "config.distill.epochs: expected an integer >= 1"),
    (["--config.finetune.grad_accum=0"], "config.finetune.grad_accum: expected"),
    (["--config.finetune.warmup_ratio=1.5"], "config.finetune.warmup_ratio"),
    (["--config.distill.label_smoothing=1.0"], "config.distill.label_smoothing"),
    (["--config.checkpoint.keep=0"], "config.checkpoint.keep: expected an integer >= 1"),
    (["--config.checkpoint.every_steps=0"], "config.checkpoint.every_steps: expected"),
    (["--config.log_every_steps=0"], "config.log_every_steps: expected"),
    (["--config.extract.shard_size=0"], "config.extract.shard_size: expected"),
    (["--config.extract.logprob_dtype=int8"], "config.extract.logprob_dtype: expected"),
    (["--config.extract.samples=0"], "config.extract.samples: expected an integer >= 1"),
    (["--config.extract.sample_seed=-1"], "config.extract.sample_seed: expected"),
    (["--config.evaluate.num_bins=()"], "config.evaluate.num_bins: expected a non-empty"),
    (["--config.evaluate.batch_size=0"], "config.evaluate.batch_size: expected"),
    (["--config.seed=-1"], "config.seed: expected"),
    (["--config.seed=100000000000000000000"], "config.seed: expected"),
    (["--config.data.num_examples=-5"], "config.data.num_examples: expected"),
    (["--config.student.model.vocab_size=50000"], "config.student.model.vocab_size: expected"),
    (["--config.checkpoint.after_done=some"], "config.checkpoint.after_done: expected"),
    # a served teacher (issue 27): where and what it is, and only students its top-k can teach
    (["--config.teacher.source=cloud"], "config.teacher.source: expected local or server"),
    (["--config.teacher.source=server", "--config.teacher.server.model=m"],
     "config.teacher.server.url: expected an http(s) URL"),
    (["--config.teacher.source=server", "--config.teacher.server.url=http://127.0.0.1:9"],
     "config.teacher.server.model: expected a non-empty name"),
    (["--config.teacher.server.api=openai"], "config.teacher.server.api: expected llama_cpp or"),
    (["--config.teacher.server.timeout_s=0"], "config.teacher.server.timeout_s: expected"),
    (["--config.teacher.source=server", "--config.teacher.server.url=http://127.0.0.1:9",
      "--config.teacher.server.model=m", "--config.students=sft,full_kd"],
     "config.students: expected no full_kd, kd-sampled or first-sampled"),
    (["--config.teacher.source=server", "--config.teacher.server.url=http://127.0.0.1:9",
      "--config.teacher.server.model=m", "--config.distill.mode=online",
      "--config.distill.temperature=search"], "config.distill.mode: expected offline"),
]


@pytest.mark.parametrize("args, needle", BAD_VALUES)
def test_bad_values_name_the_key(args, needle):
  with pytest.raises(UserError, match=None) as e:
    config_lib.load(["--config", SMOKE] + args)
  assert needle in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_missing_config_file():
  with pytest.raises(UserError, match="file not found"):
    config_lib.load(["--config", "/no/such/config.py"])


@pytest.mark.parametrize("args, needle", [
    (["--config.nonexistent=1"], "nonexistent"),
    (["--config.extract.k=abc"], "config.extract.k: expected int"),
])
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needle):
  workdir = tmp_path / "wd"
  proc = subprocess.run(
      [sys.executable, "-m", "first_jax.train", "--config", SMOKE,
       f"--config.workdir={workdir}"] + args,
      capture_output=True, text=True, cwd=tmp_path, timeout=120,
      env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], proc.stderr
  assert not workdir.exists()


def test_cli_missing_config_file_exits_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "first_jax.train", "--config", "missing.py"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
  assert proc.returncode == 2 and "missing.py: file not found" in proc.stderr


def test_demo_configs_load_and_demo_long_shares_demo_full_teacher():
  from first_jax.stages import train
  from first_jax.engine.job import teacher_fingerprint
  path = lambda name: os.path.join(ROOT, "configs", f"{name}.py")  # noqa: E731
  demo = config_lib.load(["--config", path("demo") + ":seed=1"])
  full = config_lib.load(["--config", path("demo_full") + ":seed=1"])
  long = config_lib.load(["--config", path("demo_long") + ":seed=1,epochs=4"])
  assert demo.seed == full.seed == long.seed == 1
  assert (demo.distill.epochs, full.distill.epochs, long.distill.epochs) == (1, 2, 4)
  assert len(set((demo.workdir, full.workdir, long.workdir))) == 3
  # run_demo_long.sh links demo_full's teacher in: the same fingerprint, or it would retrain
  assert teacher_fingerprint(long) == teacher_fingerprint(full)
  assert teacher_fingerprint(demo) != teacher_fingerprint(full)  # OOD sizes
  for cfg in (demo, full, long):
    train.run_checks(cfg)  # every student name parses
  # the teacher's and the students' batches cut to length buckets
  assert demo.finetune.length_buckets == demo.distill.length_buckets == (56, 72, 96)
  # the README job reads the embedded VADER data; the first study's configs keep multiemo
  assert (demo.data.source, demo.data.task) == ("vader", "tweets")
  multiemo = config_lib.load(["--config", path("multiemo") + ":seed=1"])
  for cfg in (full, long, multiemo):
    assert (cfg.data.source, cfg.data.task) == ("bigbench", "multiemo/hotels_sentence_en")
  assert multiemo.finetune.length_buckets == (64, 80, 96)


def test_finetune_length_buckets_move_the_teacher_fingerprint_only_when_set():
  from first_jax.engine import job, workspace
  smoke = config_lib.load(["--config", SMOKE])
  base_fp = job.teacher_fingerprint(smoke)
  # the key is hashed only away from its default: runs made before it existed stay done
  without = smoke.finetune.to_dict()
  del without["length_buckets"]
  # nor are the served teacher's keys (issue 27): the teacher block as it was before them
  teacher = {k: v for k, v in smoke.teacher.to_dict().items() if k not in ("source", "server")}
  assert base_fp == workspace.fingerprint(smoke.seed, smoke.tokenizer,
                                          job.Job(smoke).data_block, teacher, without)
  elsewhere = config_lib.load(["--config", SMOKE, "--config.teacher.server.url=http://h:1"])
  assert job.teacher_fingerprint(elsewhere) == base_fp
  served = ["--config", SMOKE, "--config.teacher.source=server",
            "--config.teacher.server.url=http://h:1", "--config.teacher.server.model=m"]
  fp = job.teacher_fingerprint(config_lib.load(served))
  assert fp != base_fp and fp == job.teacher_fingerprint(config_lib.load(
      served[:3] + ["--config.teacher.server.url=http://other:2"] + served[4:]))
  assert fp != job.teacher_fingerprint(config_lib.load(served + [
      "--config.teacher.server.model=m2"]))
  bucketed = config_lib.load(["--config", SMOKE, "--config.finetune.length_buckets=(24,48)"])
  assert bucketed.finetune.length_buckets == (24, 48)
  assert job.teacher_fingerprint(bucketed) != base_fp
  with pytest.raises(UserError, match=r"finetune\.length_buckets: expected lengths between 2 "
                     r"and data\.max_len \(48\)"):
    config_lib.load(["--config", SMOKE, "--config.finetune.length_buckets=(24,64)"])


@pytest.mark.parametrize("name,bundle,test_n,val_n", [
    ("trust.py", "teacher", 2000, 1000),  # the first study (multiemo)
    ("trust_vader.py", "vader/teacher", 1500, 500),  # issue 25's sizes
    ("trust_evals.py", "evals/teacher", 1000, 500),
])
def test_trust_config_shares_one_teacher_across_student_seeds(name, bundle, test_n, val_n):
  from first_jax.stages import train
  from first_jax.engine.job import Job, teacher_fingerprint
  path = os.path.join(ROOT, "configs", name)
  a = config_lib.load(["--config", path + ":seed=0"])
  b = config_lib.load(["--config", path + ":seed=2"])
  assert (a.seed, b.seed, a.distill.seed, b.distill.seed) == (0, 0, 0, 2)
  assert a.workdir != b.workdir
  # run_trust.sh links seed 0's teacher and store in: the same fingerprint, or it would retrain
  assert teacher_fingerprint(a) == teacher_fingerprint(b)
  # ... and the store committed in docs/results/teacher/ is that teacher's: a config change that
  # moved this fingerprint (e.g. demo.py's fine-tuning buckets reaching trust.py) would make
  # every student seed fine-tune the teacher again
  if bundle:
    with open(os.path.join(ROOT, "docs", "results", bundle, "store", "manifest.json")) as f:
      manifest = json.load(f)
    assert manifest["teacher"]["fingerprint"] == teacher_fingerprint(b)
    assert manifest["calibration"]["premise"]["holds"]  # the bundle's teacher is in the regime
  va, vb = (train.parse_variant("first", c) for c in (a, b))
  assert train.variant_fingerprint(Job(a), va, 1.5) != train.variant_fingerprint(Job(b), vb, 1.5)
  assert train.student_seed(a) == 0 and train.student_seed(b) == 2
  assert a.calibrate.require_premise and a.evaluate.scoring == "choices"
  n = a.data.num_examples
  assert n * a.data.test >= test_n and n * a.data.validation >= val_n
  assert (a.finetune.epochs, a.distill.epochs, a.distill.temperature_mode) == (3, 3, "log_space")
  assert a.data.num_ood_examples >= 500 and len(a.data.ood_tasks) >= 1
  train.run_checks(a)


# ----------------------------------------------------------------------------- the schema


def test_schema_names_every_key_of_base_and_nothing_else():
  keys = set(config_lib.leaves(config_lib.base()))
  schema = set(config_lib.SCHEMA)
  assert not keys - schema, f"keys of base() without a SCHEMA entry: {sorted(keys - schema)}"
  assert not schema - keys, f"SCHEMA entries that name no key of base(): {sorted(schema - keys)}"
  blocks = set(config_lib.blocks(config_lib.base()))
  assert set(config_lib.BLOCKS) <= blocks, set(config_lib.BLOCKS) - blocks


def test_schema_entries_are_complete_and_hold_their_defaults():
  defaults = config_lib.defaults()
  for key, spec in config_lib.SCHEMA.items():
    assert spec.doc.strip(), key
    assert spec.stages and set(spec.stages) <= set(config_lib.STAGES), key
    config_lib.check_key(key, defaults[key])  # every default is allowed
    if spec.choices:
      assert defaults[key] in spec.choices, key
    if config_lib.type_name(key).startswith("tuple"):
      assert spec.item is not None, f"{key}: a tuple key names its item type"


def test_teacher_and_student_model_blocks_share_one_description():
  fields = [k.split(".", 2)[2] for k in config_lib.SCHEMA if k.startswith("teacher.model.")]
  assert fields and fields == [k.split(".", 2)[2] for k in config_lib.SCHEMA
                               if k.startswith("student.model.")]
  for f in fields:
    t, s = config_lib.SCHEMA[f"teacher.model.{f}"], config_lib.SCHEMA[f"student.model.{f}"]
    assert (t.doc, t.choices, t.lo) == (s.doc, s.choices, s.lo), f


def test_model_choices_match_the_model_config():
  from first_jax.models import config as model_config
  assert config_lib.SCHEMA["teacher.model.model_type"].choices == model_config.MODEL_TYPES
  assert config_lib.SCHEMA["teacher.model.dtype"].choices == model_config.DTYPES


def test_stage_lists():
  assert config_lib.keys_for("pipeline") == list(config_lib.SCHEMA)
  train = config_lib.keys_for("train")
  assert "distill.temperature_mode" in train and "finetune.lr" not in train
  assert "calibrate.mode" in config_lib.keys_for("calibrate")
  assert "calibrate.mode" not in train
  assert "evaluate.scoring" in config_lib.keys_for("calibrate")


_CHOICE_KEYS = [k for k, s in config_lib.SCHEMA.items() if s.choices]


@pytest.mark.parametrize("key", _CHOICE_KEYS)
def test_every_key_with_allowed_values_is_checked_by_validate(key):
  with pytest.raises(UserError) as e:
    config_lib.load(["--config", SMOKE, f"--config.{key}=bogus"])
  spec = config_lib.SCHEMA[key]
  assert str(e.value).startswith(f"config.{key}: expected {spec.expected(key)}, got 'bogus'")


@pytest.mark.parametrize("args, needle", [
    (["--config.distill.b1=1.0"], "config.distill.b1: expected 0 <= value < 1"),
    (["--config.finetune.eps=0"], "config.finetune.eps: expected a value > 0"),
    (["--config.data.max_len=1"], "config.data.max_len: expected an integer >= 2"),
    (["--config.data.synthetic_size=0"], "config.data.synthetic_size: expected an integer >= 1"),
    (["--config.student.model.num_heads=0"], "config.student.model.num_heads: expected"),
    (["--config.mesh.fsdp=0"], "config.mesh.fsdp: expected a positive size or -1 (fill)"),
    (["--config.evaluate.num_bins=10,0"], "config.evaluate.num_bins: expected a non-empty"),
    (["--config.evaluate.num_bins=a,b"], "config.evaluate.num_bins: expected tuple[int]"),
    (["--config.student.layers=x"], "config.student.layers: expected tuple[int]"),
])
def test_schema_ranges_and_types(args, needle):
  with pytest.raises(UserError) as e:
    config_lib.load(["--config", SMOKE] + args)
  assert str(e.value).startswith(needle), str(e.value)


def test_tuple_overrides_accept_comma_lists_and_literals():
  cfg = config_lib.load(["--config", SMOKE, "--config.students=sft,first",
                         "--config.evaluate.num_bins=10, 20", "--config.evaluate.post_hoc=first",
                         "--config.data.ood_tasks=", "--config.evaluate.post_hoc_grid=0.5,2,9",
                         "--config.distill.length_buckets=(16, 32)"])
  assert cfg.students == ("sft", "first") and cfg.evaluate.num_bins == (10, 20)
  assert cfg.evaluate.post_hoc == ("first",) and cfg.data.ood_tasks == ()
  assert cfg.evaluate.post_hoc_grid == (0.5, 2, 9) and cfg.distill.length_buckets == (16, 32)
  cfg = config_lib.load(["--config", SMOKE, "--config.students=('sft', 'kd')",
                         "--config.data.ood_tasks='a,b', c,"])
  assert cfg.students == ("sft", "kd") and cfg.data.ood_tasks == ("a,b", "c")


def test_unknown_key_and_wrong_type_in_a_config_file(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("from first_jax import config as config_lib\n"
                  "def get_config():\n  c = config_lib.base()\n  c.distill.lrr = 1.0\n  return c\n")
  with pytest.raises(UserError, match=r"^config\.distill\.lrr: unknown key"):
    config_lib.load(["--config", str(path)])
  import ml_collections
  cfg = config_lib.load_file(SMOKE)
  with cfg.unlocked():
    cfg.extract = ml_collections.ConfigDict(dict(cfg.extract.to_dict(), k="5"))
  with pytest.raises(UserError, match=r"^config\.extract\.k: expected int, got '5'"):
    config_lib.validate(cfg)


def test_validate_without_paths(tmp_path):
  cfg = config_lib.parse(["--config", SMOKE, "--config.teacher.init=pretrained",
                          "--config.teacher.path=/no/such/model",
                          "--config.tokenizer=/no/such/tokenizer"])
  config_lib.validate(cfg, check_paths=False)
  with pytest.raises(UserError, match="config.tokenizer"):
    config_lib.validate(cfg)


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("stage", ["finetune", "extract", "calibrate", "train", "evaluate",
                                   "pipeline"])
def test_stage_help_lists_the_keys_it_reads(stage, capsys):
  import importlib
  from first_jax import cli
  module = importlib.import_module(f"first_jax.stages.{stage}")
  assert cli.stage_main(module.run, ["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: python -m first_jax.{stage} --config FILE")
  assert cli.stage_purpose(stage) and cli.stage_purpose(stage)[:40] in " ".join(out.split())
  for key in config_lib.keys_for(stage):
    assert f"\n  {key}: {config_lib.type_name(key)} = " in out, key
  assert "a,b for strings" in out and "docs/config.md" in out


def test_first_jax_help(capsys):
  from first_jax import cli
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert all(f"  {s}" in out for s in cli.STAGES)
  with pytest.raises(SystemExit) as e:
    cli.main(["calibrate", "--config", SMOKE, "-h"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: first-jax calibrate") and "calibrate.mode: str" in out
