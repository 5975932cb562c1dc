"""docs/your_data.md's configs, as a user copies them, on tiny files written here: a random
12-layer Llama saved with transformers (+ the GPT-2 tokenizer) as a HF folder and as a GGUF, a
smaller student, 80 generated questions as JSONL / Parquet / BIG-bench task.json / Alpaca JSONL.
The doc's error lines are the real output of the commands it shows."""
import json
import os
import re
import shlex
import time

import numpy as np
import pytest

from first_jax.data import sources, store, tokenizer as tokenizer_lib
from first_jax import cli, config as config_lib
from first_jax.engine.job import Job
from first_jax.stages import calibrate, extract, finetune, pipeline, train

# Slow (the default suite's 10-minute budget): the guide's commands end to end (~2 min).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "your_data.md")
CONFIGS = ("my_mcq.py", "my_bigbench.py", "my_instructions.py")
FAST = ["--config.finetune.epochs=1", "--config.distill.epochs=1", "--config.data.max_len=48"]


def doc_text() -> str:
  with open(DOC) as f:
    return f.read()


def doc_configs() -> dict[str, str]:
  """`<!-- config: NAME -->` followed by a ```python block -> {NAME: code}."""
  return dict(re.findall(r"<!-- config: (\S+) -->\s*```python\n(.*?)```", doc_text(), re.S))


def doc_errors() -> list[tuple[str, str]]:
  """The (command, error line) pairs of the ```text block after `<!-- errors -->`."""
  block = re.search(r"<!-- errors -->\s*```text\n(.*?)```", doc_text(), re.S).group(1)
  lines = block.strip().splitlines()
  return [(lines[i][2:], lines[i + 1]) for i in range(0, len(lines), 2)]


# ----------------------------------------------------------------------------- tiny files


def _questions(n: int, seed: int) -> list:
  return sources.synthetic_mcqa(n, seed=seed, kind="categories")


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def _bigbench(path: str, questions: list) -> None:
  examples = [{"input": q.input, "target_scores": {c: int(i == q.label)
                                                   for i, c in enumerate(q.choices)}}
              for q in questions]
  with open(path, "w") as f:
    json.dump({"name": os.path.basename(path), "examples": examples}, f)


def _tiny_llama(path: str, tok, num_layers: int, seed: int) -> dict[str, np.ndarray]:
  """A random Llama (transformers) saved as a HF folder with the tokenizer; its tensors."""
  import torch
  import transformers
  torch.manual_seed(seed)
  eos = tok.convert_tokens_to_ids(tok.eos_token)
  cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return {k: v.detach().numpy() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}  # tied to the embedding


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's Q/K permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _gguf(path: str, state: dict[str, np.ndarray], tok, num_layers: int) -> None:
  """The same weights as llama.cpp's converter writes them, with the byte-level BPE tokenizer."""
  import gguf
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(num_layers)
  w.add_context_length(256)
  w.add_embedding_length(32)
  w.add_feed_forward_length(64)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_vocab_size(len(tok))
  vocab = tok.get_vocab()
  tokens = [""] * len(vocab)
  for t, i in vocab.items():
    tokens[i] = t
  merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([3 if t == tok.eos_token else 1 for t in tokens])
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
  eos = vocab[tok.eos_token]
  w.add_bos_token_id(eos)
  w.add_eos_token_id(eos)
  for name, x in state.items():
    if name == "model.embed_tokens.weight":
      w.add_tensor("token_embd.weight", x)
    elif name == "model.norm.weight":
      w.add_tensor("output_norm.weight", x)
    else:
      _, _, n, *module, leaf = name.split(".")
      module = ".".join(module)
      if module == "self_attn.q_proj":
        x = _permute(x, 4)
      elif module == "self_attn.k_proj":
        x = _permute(x, 2)
      w.add_tensor(f"blk.{n}.{names[module]}.{leaf}", x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
  """A user's folder: data/, models/ and the doc's configs, as the doc describes them."""
  root = str(tmp_path_factory.mktemp("user"))
  os.makedirs(os.path.join(root, "data"))
  os.makedirs(os.path.join(root, "models"))
  qs = _questions(80, seed=0)
  rows = [{"question": q.input, "choices": q.choices, "answer": q.label} for q in qs]
  _write_jsonl(os.path.join(root, "data", "my_mcq.jsonl"), rows)
  import pandas as pd
  pd.DataFrame(rows).to_parquet(os.path.join(root, "data", "my_mcq.parquet"))
  # a CSV of the same questions, one column per choice (for the refused-config error line)
  pd.DataFrame([{"question": q.input, **dict(zip("ABCD", q.choices)), "answer": "ABCD"[q.label]}
                for q in qs]).to_csv(os.path.join(root, "data", "my_mcq.csv"), index=False)
  _bigbench(os.path.join(root, "data", "my_task.json"), qs)
  _bigbench(os.path.join(root, "data", "my_other_task.json"), _questions(24, seed=1))
  text = [{"instruction": q.input, "input": ", ".join(q.choices), "output": q.choices[q.label]}
          for q in qs]
  text[3]["output"] = ""  # one bad row: skipped (on_bad_example = "skip"), counted
  _write_jsonl(os.path.join(root, "data", "my_instructions.jsonl"), text)
  pd.DataFrame(text).to_csv(os.path.join(root, "data", "my_instructions.csv"), index=False)
  tok = tokenizer_lib.load("gpt2")
  state = _tiny_llama(os.path.join(root, "models", "my-teacher"), tok, 12, seed=0)
  _tiny_llama(os.path.join(root, "models", "my-student"), tok, 4, seed=1)
  _gguf(os.path.join(root, "models", "my-teacher.gguf"), state, tok, 12)
  for name, code in doc_configs().items():
    with open(os.path.join(root, name), "w") as f:
      f.write(code)
  return root


def split_sizes(wd: str) -> dict[str, int]:
  with open(os.path.join(wd, "data", "split.json")) as f:
    return {k: len(v["indices"]) for k, v in json.load(f)["splits"].items()}


def load(name: str, *overrides: str):
  return config_lib.load(["--config", name, *FAST, *overrides])


def test_the_doc_shows_every_config():
  assert sorted(doc_configs()) == sorted(CONFIGS)
  for code in doc_configs().values():
    assert "def get_config" in code


def test_multiple_choice_jsonl_through_the_whole_pipeline(user_dir, monkeypatch):
  monkeypatch.chdir(user_dir)
  cfg = load("my_mcq.py", "--config.students=('sft', 'first')")  # (kd: as first, no temperature)
  t0 = time.time()
  pipeline.run(Job(cfg))
  print(f"my_mcq.py pipeline: {time.time() - t0:.1f} s")
  wd = Job(cfg).layout.root
  assert wd == os.path.join(user_dir, "workdir", "my_mcq")
  with open(os.path.join(wd, "eval", "results.json")) as f:
    results = json.load(f)["results"]
  assert set(results) >= {"teacher", "sft", "first", "first+ts"}
  sizes = split_sizes(wd)
  assert sum(sizes.values()) == 80 and sizes["test"] >= 16  # data.test = 0.2 of 80
  assert results["first"]["in_domain"]["n"] == sizes["test"]
  m = store.StoreReader(os.path.join(wd, "store")).manifest
  assert m["vocab_size"] == 50257 and m["calibration"]["num_events"] == sizes["validation"]
  student = Job(cfg).load_export(os.path.join(wd, "students", "first"))
  assert student.config.num_layers == 5  # (0, 3, 6, 9, 11) of the 12


def test_the_same_questions_as_parquet(user_dir, monkeypatch):
  monkeypatch.chdir(user_dir)
  jsonl, parquet = (Job(load("my_mcq.py", *args)).data for args in (
      ["--config.workdir=workdir/j"],
      ["--config.workdir=workdir/p", "--config.data.task=data/my_mcq.parquet"]))
  for split in ("train", "validation", "test"):
    for key in ("input_ids", "label", "choice_ids"):
      np.testing.assert_array_equal(jsonl.splits[split][key], parquet.splits[split][key])


@pytest.mark.slow
def test_bigbench_task_with_a_gguf_teacher_finetunes_and_extracts(user_dir, monkeypatch):
  monkeypatch.chdir(user_dir)
  cfg = load("my_bigbench.py")
  job = Job(cfg)
  teacher = job.init_model("teacher")
  assert teacher.config.num_layers == 12 and teacher.config.vocab_size == 50257
  finetune.run(job)
  extract.run(job)
  wd = job.layout.root
  reader = store.StoreReader(os.path.join(wd, "store"))
  assert reader.num_examples == split_sizes(wd)["train"] > 50  # about 0.7 of 80
  data = job.data
  assert list(data.ood) == ["data/my_other_task.json"] and len(data.ood[
      "data/my_other_task.json"]["input_ids"]) == 24
  tok = job.tokenizer  # the GGUF's tokenizer: the GPT-2 token ids
  assert tok("Which one is a fruit?")["input_ids"] == tokenizer_lib.load("gpt2")(
      "Which one is a fruit?")["input_ids"]


def test_instructions_with_a_separate_student_distil_from_the_store(user_dir, monkeypatch,
                                                                    caplog):
  """finetune -> extract -> calibrate -> train (FIRST into models/my-student); the text
  evaluation itself is covered by tests/test_text_pipeline.py."""
  monkeypatch.chdir(user_dir)
  caplog.set_level("WARNING")
  cfg = load("my_instructions.py", "--config.students=('first',)")
  t0 = time.time()
  job = Job(cfg)
  for stage in (finetune.run, extract.run, calibrate.run, train.run):
    stage(job)
  print(f"my_instructions.py finetune..train: {time.time() - t0:.1f} s")
  assert any("1 of 80 records skipped" in r.getMessage() for r in caplog.records)
  wd = job.layout.root
  reader = store.StoreReader(os.path.join(wd, "store"))
  assert reader.spec.positions > 1  # every response token, not one answer position
  assert reader.calibration["scoring"] == "tokens"
  student = job.load_export(os.path.join(wd, "students", "first"))
  assert student.config.num_layers == 4  # models/my-student
  choice = job.choice_tasks()  # evaluate.choice_tasks reads
  assert len(choice["data/my_task.json"]["label"]) == 80
  # the same rows from a CSV file with the Alpaca columns
  csv = Job(load("my_instructions.py", "--config.workdir=workdir/c",
                 "--config.data.task=data/my_instructions.csv")).data
  assert csv.fingerprint == job.data.fingerprint  # the same examples


@pytest.mark.parametrize("index", range(4))
def test_the_doc_error_lines_are_what_a_user_sees(user_dir, monkeypatch, capsys, index):
  monkeypatch.chdir(user_dir)
  command, expected = doc_errors()[index]
  argv = shlex.split(command)
  assert argv[:3] == ["python", "-m", "first_jax.pipeline"]
  assert cli.stage_main(pipeline.run, argv[3:]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert err == [expected]
