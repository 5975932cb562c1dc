"""The sources a fresh machine can get (issue 22): VADER (embedded), the evals registry's files,
BIG-bench through `datasets`, and the human-label metric; a pipeline run on VADER."""
import io
import json
import math
import tarfile

import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.data import batches as data, sources
from first_jax.stages import evaluate


def _vader_tar(tmp_path, rows, ratings, bom=False):
  """A VADER-layout archive with one domain (tweets): GroundTruth rows (id, mean, text) and
  ratings rows (id, mean, sd, [ratings]) in their own order."""
  path = tmp_path / "vader.tar.xz"
  files = {"tweets_GroundTruth.txt": "".join(f"{i}\t{m}\t{t}\n" for i, m, t in rows),
           "tweets_anonDataRatings.txt": ("\ufeff" if bom else "") + "".join(
               f"{i}\t{np.mean(r)}\t{np.std(r)}\t{r}\n" for i, r in ratings),
           "_README_.txt": "caf\xe9".encode("cp1252").decode("latin-1")}
  with tarfile.open(path, "w:xz") as tf:
    for name, text in files.items():
      raw = text.encode("latin-1") if name.startswith("_") else text.encode("utf-8")
      info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
      info.size = len(raw)
      tf.addfile(info, io.BytesIO(raw))
  return path


def test_load_vader_labels_human_shares_and_joins_by_id(tmp_path):
  rng = np.random.default_rng(11)
  rows, ratings = [], []
  for i in range(40):
    r = [int(x) for x in rng.integers(-4, 5, size=int(rng.integers(5, 25)))]
    rows.append((f"7_{i}", float(np.mean(r)), f"text {i} &amp; more"))
    ratings.append((f"7_{i}", r))
  rng.shuffle(ratings)  # another order than the ground truth (the Amazon file's way)
  path = _vader_tar(tmp_path, rows, ratings, bom=True)
  for band in (0.5, 1.0):
    exs = sources.load_vader("tweets", neutral_band=band, archive=path)
    assert len(exs) == 40
    by_id = dict(ratings)
    for (key, mean, _), ex in zip(rows, exs):
      want = 0 if mean < -band else 2 if mean > band else 1
      assert ex.label == want and ex.choices == ["negative", "neutral", "positive"]
      r = np.asarray(by_id[key], np.float64)
      share = [np.mean(r < -band), np.mean(np.abs(r) <= band), np.mean(r > band)]
      np.testing.assert_allclose(ex.human, share, atol=1e-12)
      assert math.isclose(sum(ex.human), 1.0)
      assert "&amp;" not in ex.input and "& more" in ex.input
      assert ex.source == "vader/tweets"
  with pytest.raises(UserError, match="data.task 'films': expected a VADER domain"):
    sources.load_vader("films", archive=path)
  with pytest.raises(UserError, match="has no movieReviewSnippets_GroundTruth.txt"):
    sources.load_vader("movie_reviews", archive=path)
  broken = _vader_tar(tmp_path, rows, ratings[1:])
  sources._vader_files.cache_clear()
  with pytest.raises(UserError, match=f"no ratings for id '{ratings[0][0]}'"):
    sources.load_vader("tweets", archive=broken)


def test_embedded_vader_counts():
  """The committed copy: every domain's size, and the tweets' classes at the shipped band."""
  sizes = {"tweets": 4200, "movie_reviews": 10605, "amazon_reviews": 3708, "nyt_editorials": 5190}
  for domain, n in sizes.items():
    exs = sources.load_vader(domain)
    assert len(exs) == n and all(e.human is not None for e in exs)
  labels = np.bincount([e.label for e in sources.load_vader("tweets", 0.5)], minlength=3)
  assert labels.tolist() == [1062, 838, 2300]


def _evals_file(tmp_path, lines):
  path = tmp_path / "samples.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  return path


def test_load_evals_both_option_layouts_and_bad_lines(tmp_path, caplog):
  sys_msg = {"role": "system", "content": "Answer with the letter."}
  lines = [
      {"input": [sys_msg, {"role": "user", "content": "The resistance\n\n A: increases\n B: "
                                                      "decreases"}], "ideal": "A"},
      {"input": [{"role": "user", "content": "Kim said A: hi. What next? A: talk; B: leave; "
                                             "C: thank kim."}], "ideal": "C"},
      {"sample": [{"role": "system", "content": "few-shot"}]},  # no input
      {"input": [{"role": "user", "content": "No options here"}], "ideal": "A"},
      {"input": [{"role": "user", "content": "Q\n A: x\n B: y"}], "ideal": "D"},
  ]
  path = _evals_file(tmp_path, lines)
  with pytest.raises(UserError, match=r"samples.jsonl: line 3: field 'input'"):
    sources.load_evals(path)
  caplog.set_level("WARNING")
  exs = sources.load_evals(path, on_bad="skip")
  assert [(e.input, e.choices, e.label) for e in exs] == [
      ("The resistance", ["increases", "decreases"], 0),
      ("Kim said A: hi. What next?", ["talk", "leave", "thank kim"], 2)]
  assert any("3 of 5 records skipped" in r.getMessage() for r in caplog.records)
  texts = sources.load_evals_text(_evals_file(tmp_path, lines[:2]))
  assert texts[0] == sources.TextExample(
      "Answer with the letter.\n\nThe resistance\n\n A: increases\n B: decreases", "A")
  with pytest.raises(UserError, match="no records"):
    sources.load_evals(_evals_file(tmp_path, []))


def test_load_evals_lettered_lines_with_an_answer_cue(tmp_path):
  """LogiQA / FCC exam layout: options as "A. x" lines (LogiQA repeats the letter, "A. A.x"),
  the last message ending in "Answer:"; a period inside a choice stays."""
  lines = [
      {"input": [{"role": "system", "content": "Choose."},
                 {"role": "user", "content": "Passage: P. Question: which?\nA. A.Zhao drove.\n"
                                             "B. B.Li sailed.\nC. C.Wang flew.\nAnswer:"}],
       "ideal": "B"},
      {"input": [{"role": "user", "content": "Which frequency?\nA. 18.068 MHz\nB. 18.1 MHz\n"}],
       "ideal": "A"},
      {"input": [{"role": "user", "content": "A. is not an option list\nAnswer:"}], "ideal": "A"},
  ]
  exs = sources.load_evals(_evals_file(tmp_path, lines), on_bad="skip")
  assert [(e.input, e.choices, e.label) for e in exs] == [
      ("Passage: P. Question: which?", ["Zhao drove", "Li sailed", "Wang flew"], 1),
      ("Which frequency?", ["18.068 MHz", "18.1 MHz"], 0)]


def test_bigbench_through_datasets_score_lists(tmp_path):
  """BIG-bench as the hub serves it (google/bigbench: inputs, multiple_choice_targets,
  multiple_choice_scores), read offline from a local file with the same columns."""
  rng = np.random.default_rng(5)
  rows = []
  for i in range(12):
    k = int(rng.integers(2, 5))
    gold = int(rng.integers(k))
    rows.append({"idx": i, "inputs": f"q{i}", "targets": [f"c{gold}"],
                 "multiple_choice_targets": [f"c{j}" for j in range(k)],
                 "multiple_choice_scores": [int(j == gold) for j in range(k)]})
  path = tmp_path / "bigbench_task.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  exs = sources.load_hf(str(path), "train", {"input": "inputs",
                                             "choices": "multiple_choice_targets",
                                             "label": "multiple_choice_scores"})
  assert [e.label for e in exs] == [r["multiple_choice_scores"].index(1) for r in rows]
  assert [e.choices for e in exs] == [r["multiple_choice_targets"] for r in rows]
  with pytest.raises(ValueError, match="exactly one best"):
    sources._parse_label([1, 1], ["a", "b"], sources.LETTERS)


def test_human_metrics_against_float64():
  rng = np.random.default_rng(21)
  n, c = 64, 3
  logits = rng.normal(size=(n, c)) * 2
  human = rng.dirichlet(np.ones(c), size=n)
  human[0] = [0.0, 1.0, 0.0]  # a unanimous sentence
  human[1] = np.nan  # a row without raters
  t = 1.7
  got = evaluate.human_metrics({"choice_logprobs": logits.astype(np.float32)},
                               {"human": human.astype(np.float32)}, t, (10,))
  keep = np.arange(n) != 1
  z = logits[keep] / t
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = human[keep]
  kl = np.sum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1) / p), 0), -1).mean()
  agree = h[np.arange(len(h)), p.argmax(-1)]
  conf = p.max(-1)
  edges = np.linspace(0, 1, 11)
  bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, 9)
  ece = sum(abs(conf[bins == b].mean() - agree[bins == b].mean()) * np.mean(bins == b)
            for b in range(10) if np.any(bins == b))
  assert got["human_n"] == n - 1
  assert got["human_kl"] == pytest.approx(kl, rel=1e-5)
  assert got["human_agreement"] == pytest.approx(agree.mean(), rel=1e-6)
  assert got["human_ece"] == pytest.approx(ece, abs=1e-5)
  # a model whose probabilities are the raters' shares has KL 0
  with np.errstate(divide="ignore"):  # log 0 = -inf where no rater chose an answer
    lp_h = np.log(h).astype(np.float32)
  zero = evaluate.human_metrics({"choice_logprobs": lp_h}, {"human": h.astype(np.float32)},
                                1.0, (10,))
  assert zero["human_kl"] == pytest.approx(0.0, abs=1e-5)


def test_encode_mc_carries_human_shares():
  from first_jax.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load("gpt2")
  exs = [sources.MCExample("a", ["x", "y", "z"], 0, human=(0.2, 0.3, 0.5)),
         sources.MCExample("b", ["x", "y"], 1)]
  arrays = data.encode_mc(exs, tok, 32)
  np.testing.assert_allclose(arrays["human"][0], [0.2, 0.3, 0.5])
  assert np.isnan(arrays["human"][1]).all()
  assert "human" not in data.encode_mc(exs[1:], tok, 32)
  # examples without raters hash as they did before the field existed
  assert data.example_sha256(exs[1:]) == data.example_sha256(
      [sources.MCExample("b", ["x", "y"], 1, "")])
  assert data.example_sha256(exs[:1]) != data.example_sha256(
      [sources.MCExample("a", ["x", "y", "z"], 0)])


def test_vader_config_data_carries_the_raters(tmp_path):
  """The README job's data as the stages get it: splits of the tweets, 3 choices, the raters'
  shares on every row in-domain and out-of-domain."""
  import os
  from first_jax import config as config_lib
  from first_jax.engine.job import Job
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load(["--config", os.path.join(root, "configs", "demo.py"),
                         f"--config.workdir={tmp_path}", "--config.tokenizer=gpt2",
                         "--config.data.num_examples=200", "--config.data.num_ood_examples=20"])
  d = Job(cfg).data
  assert d.num_choices == 3 and list(d.ood) == ["movie_reviews", "amazon_reviews",
                                                 "nyt_editorials"]
  assert sum(len(d.splits[s]["label"]) for s in ("train", "validation", "test")) == 200
  for arrays in (*d.splits.values(), *d.ood.values()):
    h = arrays["human"]
    assert h.shape == (len(arrays["label"]), 3) and np.allclose(h.sum(-1), 1.0)
    # the label is the mean rating's class, the shares each rater's: they mostly agree
    assert np.mean(h.argmax(-1) == arrays["label"]) > 0.7


@pytest.mark.slow
def test_pipeline_on_vader_reports_the_human_metrics(tmp_path):
  """Every stage on the embedded VADER data (tiny random models, the GPT-2 tokenizer): the
  raters' shares ride along the training batches unharmed and the evaluation reports the
  human-label metrics beside ECE, in-domain and out-of-domain."""
  import os
  from first_jax import cli
  from first_jax.stages import pipeline
  smoke = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "smoke.py")
  wd = tmp_path / "wd"
  args = ["--config", smoke, f"--config.workdir={wd}", "--config.data.source=vader",
          "--config.data.task=tweets", "--config.data.num_examples=200",
          "--config.data.ood_tasks=('nyt_editorials',)", "--config.data.num_ood_examples=40",
          "--config.data.max_len=64", "--config.data.shuffle_choices=false",
          "--config.finetune.epochs=1", "--config.distill.epochs=1",
          "--config.students=('sft','first')"]
  assert cli.stage_main(pipeline.run, args) == 0
  with open(wd / "eval" / "results.json") as f:
    results = json.load(f)["results"]
  for row in ("teacher", "sft", "first", "sft+ts"):
    for s in ("in_domain", "ood:nyt_editorials"):
      r = results[row][s]
      assert r["human_n"] == r["n"] and r["human_kl"] > 0 and 0 < r["human_agreement"] < 1
      assert 0 <= r["human_ece"] <= 1
  assert results["sft"]["in_domain"]["human_kl"] != results["first"]["in_domain"]["human_kl"]
  md = (wd / "eval" / "results.md").read_text()
  assert "Against the human raters" in md and "nyt_editorials human_kl" in md


@pytest.mark.parametrize("config", ["multiemo.py", "trust.py", "demo_full.py", "demo_long.py"])
def test_configs_on_bigbench_stop_in_one_line_without_a_copy(tmp_path, monkeypatch, capsys,
                                                             config):
  """A fresh machine (empty cache, the registry without BIG-bench 1.0.0: pip finds nothing):
  the first study's configs exit 2 before writing anything, with one line naming the asset and
  how to supply it."""
  import os
  from first_jax import cli
  from first_jax.stages import pipeline
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.delenv("FIRST_JAX_BIGBENCH", raising=False)
  monkeypatch.setenv("FIRST_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("FIRST_JAX_PIP_ARGS", f"--no-index --find-links {tmp_path}")
  code = cli.stage_main(pipeline.run, ["--config", os.path.join(root, "configs", config),
                                       f"--config.workdir={tmp_path}/wd"])
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
  assert code == 2 and len(errors) == 1, errors
  assert "asset bigbench" in errors[0] and "FIRST_JAX_BIGBENCH" in errors[0]
  assert not (tmp_path / "wd").exists()


def test_out_of_domain_tasks_with_more_choices_share_one_answer_width(tmp_path):
  """A 2-choice in-domain task beside a 3-choice out-of-domain one (QuaRTz and SocialIQa in
  configs/trust_evals.py): every set is encoded with the most choices of any question."""
  import os
  from first_jax import config as config_lib
  from first_jax.engine.job import Job
  rng = np.random.default_rng(11)
  two = [{"input": [{"role": "user", "content": f"q{i} A: up B: down"}],
          "ideal": "AB"[rng.integers(2)]} for i in range(40)]
  three = [{"input": [{"role": "user", "content": f"s{i}? A: x; B: y; C: z."}],
            "ideal": "ABC"[rng.integers(3)]} for i in range(12)]
  (tmp_path / "in").mkdir()
  (tmp_path / "ood").mkdir()
  ind, ood = _evals_file(tmp_path / "in", two), _evals_file(tmp_path / "ood", three)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load(["--config", os.path.join(root, "configs", "smoke.py"),
                         f"--config.workdir={tmp_path / 'w'}", "--config.data.source=evals",
                         f"--config.data.task={ind}", f"--config.data.ood_tasks=('{ood}',)",
                         "--config.data.num_examples=40", "--config.data.num_ood_examples=12"])
  d = Job(cfg).data
  assert d.num_choices == 3
  for arrays in (*d.splits.values(), *d.ood.values()):
    assert arrays["choice_ids"].shape[-1] == 3
  assert (d.splits["train"]["choice_ids"][:, 2] < 0).all()  # the in-domain third slot is padding
  assert sorted(set(d.ood[str(ood)]["label"].tolist())) == [0, 1, 2]
