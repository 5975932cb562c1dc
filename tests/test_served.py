"""A teacher behind an inference server (first_jax.engine.served), against the loopback server
(tests/served_loopback.py) in both response schemas: the top-k read at the right positions and
equal to a float64 reference, ambiguous texts dropped and counted, retries, the start-up checks,
a server that dies mid-extraction and the resumed store, and the smoke pipeline end to end with
`teacher.source=server` (its evaluation equal to the in-process run's)."""
import json
import os

import numpy as np
import pytest

from first_jax import cli
from first_jax.data import store, tokenizer as tokenizer_lib
from first_jax.engine import served
from first_jax.stages import pipeline
from tests.served_loopback import Loopback, jax_scorer
from tests.test_config import SMOKE

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "served")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("gpt2")


def random_scorer(seed: int, vocab: int):
  """log-probs [L, V] of a fixed random 'model': row j depends on the ids up to j only."""
  def score(ids):
    out = np.empty((len(ids), vocab), np.float32)
    for j in range(len(ids)):
      rng = np.random.default_rng([seed, j, int(sum(ids[:j + 1])) % 9973])
      z = rng.standard_normal(vocab) * 3.0
      out[j] = z - np.logaddexp.reduce(z.astype(np.float64))
    return out
  return score


def client_for(lb: Loopback, tok, **kw) -> served.Client:
  s = served.Server(url=lb.url, api=lb.api, model=lb.model, backoff_s=0.01, **kw)
  return served.Client(s, tok)


def rows_of(tok, texts, answer_only: bool, seed: int = 0):
  enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  length = max(map(len, enc)) + 2
  n = len(enc)
  ids = np.zeros((n, length), np.int32)
  mask = np.zeros((n, length), np.int32)
  loss = np.zeros((n, length), np.float32)
  rng = np.random.default_rng(seed)
  pos = np.zeros(n, np.int32)
  for r, e in enumerate(enc):
    ids[r, :len(e)], mask[r, :len(e)] = e, 1
    pos[r] = rng.integers(2, len(e) - 1)
    loss[r, pos[r]:len(e) - 1] = 1
  return {"input_ids": ids, "attention_mask": mask, "answer_pos": pos, "loss_mask": loss}


TEXTS = ["The answer to the question is (B) because 12 apples weigh more.",
         "Q: Is a whale a fish? A: no, it is a mammal \u2014 na\u00efve ones think so.",
         "Sentiment of 'what a lovely, sunny day!!' : positive",
         "x = 3 * (4 + 5); print(x)  # 27"]


def reference(score, arrays, k, answer_only, texts_by_id=None):
  """float64 top-k per scored position straight from the scorer (ambiguous ids dropped when
  `texts_by_id` says which are)."""
  out = {}
  for r in range(len(arrays["input_ids"])):
    n = int(arrays["attention_mask"][r].sum())
    lp = score(list(arrays["input_ids"][r, :n]))
    scored = ([int(arrays["answer_pos"][r])] if answer_only
              else np.flatnonzero(arrays["loss_mask"][r] > 0))
    for j in scored:
      order = np.argsort(-lp[j], kind="stable")[:k]
      if texts_by_id is not None:
        order = [i for i in order if i in texts_by_id]
      out[(r, int(j))] = (list(order), lp[j, order].astype(np.float64))
  return out


@pytest.mark.parametrize("api", ["llama_cpp", "vllm"])
@pytest.mark.parametrize("answer_only", [True, False])
def test_served_topk_equals_reference(tok, api, answer_only):
  score = random_scorer(1, len(tok))
  arrays = rows_of(tok, TEXTS, answer_only)
  with Loopback(score, tok, api) as lb:
    c = client_for(lb, tok, concurrency=3)
    top = c.topk_rows(arrays, 5, answer_only, "test")
  unique = set(c.index.values()) if api == "llama_cpp" else None
  ref = reference(score, arrays, 5, answer_only, unique)
  assert len(ref) == (len(TEXTS) if answer_only else arrays["loss_mask"].sum())
  scored = np.zeros(arrays["input_ids"].shape, bool)
  for (r, j), (ids, lps) in ref.items():
    scored[r, j] = True
    m = len(ids)
    np.testing.assert_array_equal(top["teacher_ids"][r, j, :m], ids)
    np.testing.assert_allclose(top["teacher_logprobs"][r, j, :m], lps, rtol=0, atol=1e-6)
    assert (top["teacher_logprobs"][r, j, m:] == store.TAIL_FLOOR).all()
    np.testing.assert_allclose(top["teacher_tail"][r, j],
                               np.log1p(-np.exp(lps).sum()), rtol=0, atol=1e-5)
  assert (top["teacher_tail"][~scored] == 0).all() and (top["teacher_ids"][~scored] == 0).all()
  dropped = sum(5 - len(ids) for ids, _ in ref.values())
  assert c.counts["ambiguous"] == dropped and c.counts["retries"] == 0
  assert c.counts["requests"] == len(TEXTS) and c.counts["bytes_received"] > 0


def test_ambiguous_texts_are_the_ones_printed_alike(tok):
  texts = served.token_texts(tok)
  index = served.text_index(texts)
  assert texts[tok.convert_tokens_to_ids("\u0120the")] == " the"
  assert index[" the"] == tok.convert_tokens_to_ids("\u0120the")
  ambiguous = [i for i, t in enumerate(texts) if t not in index]
  # byte fragments of multi-byte characters print nothing (invalid UTF-8 dropped), as does the
  # control token; every other id round-trips through its text
  assert tok.convert_tokens_to_ids("<|endoftext|>") in ambiguous
  assert all(texts[i] in ("", "\ufffd") or texts.count(texts[i]) > 1 for i in ambiguous[:50])
  assert 100 < len(ambiguous) < 1000, len(ambiguous)
  assert all(index[texts[i]] == i for i in range(0, len(texts), 97) if texts[i] in index)


def test_retries_then_success_and_then_one_line(tok):
  score = random_scorer(2, len(tok))
  arrays = rows_of(tok, TEXTS[:1], True)
  with Loopback(score, tok, "vllm") as lb:
    c = client_for(lb, tok, retries=2)
    lb.fail = [503, 429]
    c.topk_rows(arrays, 5, True, "test")
    assert c.counts["retries"] == 2 and c.counts["requests"] == 1
    lb.fail = [500, 502, 503]
    with pytest.raises(served.ServerError, match=r"HTTP 503.*injected 503"):
      c.topk_rows(arrays, 5, True, "test")
    lb.fail = [400]  # not retried
    with pytest.raises(served.ServerError, match="HTTP 400"):
      c.topk_rows(arrays, 5, True, "test")
    assert c.counts["retries"] == 4
    lb.delay_s = 0.5
    c = client_for(lb, tok, retries=1, timeout_s=0.1)
    with pytest.raises(served.ServerError, match=r"unreachable after 2 tries \(.*timed out"):
      c.topk_rows(arrays, 5, True, "test")


@pytest.mark.parametrize("api", ["llama_cpp", "vllm"])
def test_startup_checks(tok, api):
  score = random_scorer(3, len(tok))
  with Loopback(score, tok, api, max_logprobs=20) as lb:
    client_for(lb, tok).check(20)  # passes
    with pytest.raises(served.ServerError, match="config.teacher.server.model: 'other'"):
      served.Client(served.Server(url=lb.url, api=api, model="other"), tok).check(5)
    lb.tokenize_shift = 1
    with pytest.raises(served.ServerError, match="config.tokenizer: the served model tokenizes"):
      client_for(lb, tok).check(5)
    lb.tokenize_shift = 0
    if api == "vllm":  # llama-cpp-python has no limit
      with pytest.raises(served.ServerError, match=r"config.extract.k: .*refused 25 .*greater "
                                                   r"than max allowed: 20"):
        client_for(lb, tok).check(25)
    url = lb.url
  with pytest.raises(served.ServerError, match=f"teacher.server.url: {url}/v1/models "
                                               f"unreachable after 2 tries"):
    served.Client(served.Server(url=url, api=api, model="teacher", retries=1, backoff_s=0.01),
                  tok).check(5)


def test_llama_cpp_prompt_tokenized_differently_is_one_line(tok):
  score = random_scorer(4, len(tok))
  arrays = rows_of(tok, TEXTS[:1], True)
  with Loopback(score, tok, "llama_cpp") as lb:
    lb.tokenize_shift = 1
    with pytest.raises(served.ServerError, match="tokenized the prompt differently"):
      client_for(lb, tok).topk_rows(arrays, 5, True, "test")


def test_schema_matches_the_recorded_server(tok):
  """The loopback's llama_cpp answers have the keys and types llama-cpp-python's server gave
  (tests/fixtures/served/llama_cpp_*.json, recorded by bench.served_teacher --record)."""
  path = os.path.join(FIXTURES, "llama_cpp_completion.json")
  if not os.path.exists(path):
    pytest.skip("no recorded fixture")
  with open(path) as f:
    rec = json.load(f)
  body = rec["request"]
  with Loopback(random_scorer(5, len(tok)), tok, "llama_cpp") as lb:
    ours = lb.completion(body)[1]

  def shape(x):  # keys and types, a top_logprobs dict as its size and value types
    if isinstance(x, dict) and x and all(isinstance(v, float) for v in x.values()):
      return ("top", len(x))
    if isinstance(x, dict):
      return {k: shape(v) for k, v in x.items() if k not in ("id", "created", "model")}
    if isinstance(x, list):
      return [shape(x[0]), shape(x[-1])] if x else []
    return type(x).__name__
  theirs = rec["response"]
  assert set(ours) == set(theirs) and set(ours["choices"][0]) == set(theirs["choices"][0])
  assert shape(ours["choices"][0]) == shape(theirs["choices"][0])
  lp, real = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
  # one entry per PROMPT token (none for the generated one), the first null
  assert len(real["tokens"]) == len(real["top_logprobs"]) == len(real["token_logprobs"])
  assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["token_logprobs"])
  assert real["top_logprobs"][0] is None and lp["top_logprobs"][0] is None
  # k entries and token j's own (k + 1 unless it is among them)
  k = body["logprobs"]
  assert all(k <= len(e) <= k + 1 for e in real["top_logprobs"][1:])
  assert all(k <= len(e) <= k + 1 for e in lp["top_logprobs"][1:])


def test_smoke_pipeline_served_resumes_and_equals_in_process(smoke_workdir, tmp_path):
  """The smoke pipeline with `teacher.source=server`, the loopback serving the in-process run's
  fine-tuned teacher (llama_cpp schema): the server dies mid-extraction (one line, exit 2,
  finished shards kept), a server started again is asked only for the rest, and the store, the
  calibrated temperature and the FIRST student's evaluation equal the in-process run's."""
  from first_jax import config as config_lib
  from first_jax.engine.job import Job
  job = Job(config_lib.load(["--config", SMOKE, f"--config.workdir={smoke_workdir}"]))
  score = jax_scorer(job.load_export(job.layout.teacher, "teacher"), job.cfg.data.max_len)
  wd = str(tmp_path / "served")

  def args(url):
    return ["--config", SMOKE, f"--config.workdir={wd}", "--config.teacher.source=server",
            f"--config.teacher.server.url={url}", "--config.teacher.server.model=smoke-teacher",
            "--config.students=first", "--config.extract.shard_size=64",
            "--config.teacher.server.retries=1", "--config.teacher.server.backoff_s=0.01",
            "--config.teacher.server.concurrency=2"]

  with Loopback(score, job.tokenizer, "llama_cpp", model="smoke-teacher") as lb:
    lb.die_after = 1 + 150  # the k probe, then 150 rows: two shards of 64, then it dies
    assert cli.stage_main(pipeline.run, args(lb.url)) == 2
  m = store.read_manifest(os.path.join(wd, "store"))
  assert len(m["shards"]) == 2 and not m.get("complete")
  with Loopback(score, job.tokenizer, "llama_cpp", model="smoke-teacher") as lb:
    assert cli.stage_main(pipeline.run, args(lb.url)) == 0  # another port: the same teacher
    asked = lb.completions
  ours, theirs = (store.StoreReader(os.path.join(d, "store")) for d in (wd, smoke_workdir))
  n_train = ours.num_examples
  n_val = len(job.data.splits["validation"]["input_ids"])
  assert asked == 1 + (n_train - 128) + n_val  # probe, the rest of the rows, calibration
  ids = np.arange(n_train)
  a, b = ours.read(ids), theirs.read(ids)
  at = job.data.splits["train"]["loss_mask"] > 0
  same = a["ids_NxLxK"][at] == b["ids_NxLxK"][at]
  assert same.mean() > 0.99, same.mean()  # the rest: ambiguous texts dropped (counted)
  served_block = store.read_manifest(os.path.join(wd, "store"))["served"]
  assert served_block["ambiguous"] >= (~same).any(-1).sum()
  both = same.all(-1)
  np.testing.assert_allclose(a["logprobs_NxLxK"][at][both], b["logprobs_NxLxK"][at][both],
                             rtol=0, atol=2e-3)
  ca, cb = (store.read_manifest(os.path.join(d, "store"))["calibration"]
            for d in (wd, smoke_workdir))
  assert ca["temperature"] == pytest.approx(cb["temperature"], rel=1e-3)
  ra, rb = (json.load(open(os.path.join(d, "eval", "results.json")))["results"]["first"]
            for d in (wd, smoke_workdir))
  assert "teacher" not in json.load(open(os.path.join(wd, "eval", "results.json")))["results"]
  for key in ("accuracy", "ece", "nll"):
    assert ra["in_domain"][key] == pytest.approx(rb["in_domain"][key], abs=0.01), key


@pytest.mark.slow
def test_real_llama_cpp_server_agrees_with_the_in_process_teacher():
  """llama-cpp-python's server (the [serve] extra) with the SmolLM2 GGUF against the same
  weights in process, at every position of 4 validation rows: the positions line up (top-1
  agreement where our top-1 has a text of its own) and the log-probs differ by the Q4_1
  server's quantisation only. `python -m bench.served_teacher` records the full figures."""
  pytest.importorskip("llama_cpp")
  from bench import served_teacher as bench
  from first_jax.data import assets
  gguf = str(assets.fetch("smollm2"))
  port = bench.free_port()
  server = bench.start_server(gguf, port, threads=2)
  try:
    r = bench.agreement(f"http://127.0.0.1:{port}", rows=4)
  finally:
    bench.stop(server)
  assert r["top1_id_agreement_where_mappable"] > 0.9, r
  assert r["topk_id_overlap_mean_of_mappable"] > 0.85, r
  assert r["abs_delta_logprob"]["median"] < 0.2 and r["abs_delta_logprob"]["max"] < 2.0, r
