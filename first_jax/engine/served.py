"""A teacher behind an inference server: its top-k log-probs per scored position, over HTTP.

    server = served.Server.of(cfg.teacher.server)
    client = served.Client(server, tokenizer)
    client.check(k)                  # start-up: reachable, model known, k allowed, same tokenizer
    top = client.topk_rows(arrays, k, answer_only, desc="extract")   # as `infer.topk_rows`

The rows' token ids go in, and for every scored position come back the server's top-k token ids
and log-probs at temperature 1 (what servers return), normalised over the full vocabulary by the
server; the tail (the mass outside them) is log(1 - sum of their probabilities). The result has
the in-process extraction's layout ([N, L, K] ids and log-probs, [N, L] tail; other positions id
0, log-prob TAIL_FLOOR, tail 0), so the store, the calibration, the students and the evaluation
run unchanged (docs/served_teacher.md).

Two response schemas (`teacher.server.api`):
- `llama_cpp`: llama-cpp-python's server (`python -m llama_cpp.server --logits_all true`),
  `/v1/completions` with `echo` and `logprobs`. The prompt goes in as text (the server tokenizes
  it; every response's echoed tokens are compared with ours) and the top log-probs come back
  keyed by token TEXT, not id: `top_logprobs[j]` is the distribution of the logits at position j
  (predicting token j + 1; position 0 is always null), plus an entry for token j itself. Texts
  map back to ids through our tokenizer; a text that several ids print as (byte fragments, control
  tokens) is ambiguous: that entry is dropped and its mass left in the tail (counted).
- `vllm`: vLLM's OpenAI server, `/v1/completions` with the prompt as token ids and
  `prompt_logprobs`: entry i (keyed by token id, with its rank) is the distribution predicting
  token i, so position j's top-k is entry j + 1. Exact ids, nothing ambiguous. Tested against
  the loopback server only (no vLLM runs here).

Transport: a pool of `concurrency` requests in flight, one row per request; a request that fails
with HTTP 429 / 5xx, a timeout or a refused connection is retried `retries` times with
exponential backoff and jitter; then one line (`ServerError`) names the server and the status.
Requests, retries, bytes and dropped entries are counted (`Client.counts`; extraction adds them
to the store manifest's `served` block).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np

from first_jax.core.topk import TAIL_FLOOR
from first_jax.runtime import log as log_lib
from first_jax.runtime.errors import UserError

log = logging.getLogger(__name__)
APIS = ("llama_cpp", "vllm")
RETRY_STATUS = (429, 500, 502, 503, 504)
REPORT_K = 20  # calibrate reads the top 20 (the concentrated-knowledge report), extract the top k
# The tokenizer probe (start-up): words, digits, punctuation, whitespace runs and non-ASCII text.
PROBE_TEXT = ("The 2 teachers' answers: (B) 1,024 tokens\u2014na\u00efve, \u00fcber \u65e5\u672c"
              "\u8a9e!\n\n  Q: 7+35=? A:")


class ServerError(UserError):
  """The served teacher failed (unreachable, refused, wrong answer): one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Server:
  """The config's `teacher.server` block."""
  url: str
  api: str
  model: str
  concurrency: int = 4
  timeout_s: float = 120.0
  retries: int = 3
  backoff_s: float = 0.5

  @classmethod
  def of(cls, block) -> "Server":
    return cls(url=block.url.rstrip("/"), api=block.api, model=block.model,
               concurrency=block.concurrency, timeout_s=float(block.timeout_s),
               retries=block.retries, backoff_s=float(block.backoff_s))


# ---------------------------------------------------------------------------------------------
# token ids <-> the texts a llama.cpp server prints them as

def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet back to bytes (transformers' `bytes_to_unicode`, inverted)."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return {c: b for b, c in bytes_to_unicode().items()}


def token_texts(tok) -> list[str]:
  """The text each token id prints as on its own, as llama.cpp's detokenizer prints it (its
  bytes decoded as UTF-8, invalid bytes dropped; control tokens print nothing)."""
  dec = _byte_decoder()
  special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items()
                                         if t.special}
  out = []
  for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
    if i in special or piece is None:
      out.append("")
    elif all(ch in dec for ch in piece):  # byte-level BPE
      out.append(bytes(dec[ch] for ch in piece).decode("utf-8", errors="ignore"))
    else:  # an added (user-defined) token: its own text
      out.append(tok.convert_tokens_to_string([piece]))
  return out


def text_index(texts: Sequence[str]) -> dict[str, int]:
  """{text: id} for every text exactly one id prints as (the others are ambiguous)."""
  first: dict[str, int] = {}
  seen_twice: set[str] = set()
  for i, t in enumerate(texts):
    if t in first:
      seen_twice.add(t)
    else:
      first[t] = i
  return {t: i for t, i in first.items() if t not in seen_twice}


# ---------------------------------------------------------------------------------------------
# the two response schemas

class LlamaCpp:
  """llama-cpp-python's server (see the module docstring)."""
  name = "llama_cpp"
  tokenize_path = "/extras/tokenize"

  @staticmethod
  def tokenize_body(model: str, text: str) -> dict:
    return {"model": model, "input": text}

  @staticmethod
  def tokens_of(resp: dict) -> list[int]:
    return list(resp["tokens"])

  @staticmethod
  def prompt_len(last: int, length: int) -> int:
    """Tokens sent to read position `last`: up to and including it."""
    del length
    return last + 1

  @staticmethod
  def body(model: str, ids: Sequence[int], text: str, k: int) -> dict:
    del ids
    return {"model": model, "prompt": text, "max_tokens": 1, "echo": True, "logprobs": k,
            "temperature": 0.0, "seed": 0}

  @staticmethod
  def parse(resp: dict, ids: Sequence[int], positions: Sequence[int], k: int, c: "Client",
            where: str) -> list[list[tuple[int, float]]]:
    lp = _choice(resp, where).get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list):
      raise ServerError(f"teacher.server: {where}: the response has no logprobs.top_logprobs "
                        f"(start llama_cpp.server with --logits_all true)")
    echoed, tops = lp.get("tokens") or [], lp["top_logprobs"]
    want = [c.texts[i] for i in ids]
    if echoed[:len(want)] != want or len(tops) < len(want):
      raise ServerError(
          f"teacher.server: {where}: the server tokenized the prompt differently from "
          f"config.tokenizer ({len(echoed)} tokens echoed for {len(want)} sent; first difference "
          f"at token {_first_diff(echoed, want)}): serve a model with the same tokenizer")
    out = []
    for j in positions:
      entries = tops[j]
      if not isinstance(entries, dict):
        raise ServerError(f"teacher.server: {where}: no top log-probs at position {j}")
      pairs = []
      for text, value in list(entries.items())[:k]:  # the (k+1)-th: token j's own entry
        i = c.index.get(text)
        if i is None:
          c.count(ambiguous=1)
        else:
          pairs.append((i, float(value)))
      out.append(pairs)
    return out


class Vllm:
  """vLLM's OpenAI-compatible server (see the module docstring)."""
  name = "vllm"
  tokenize_path = "/tokenize"

  @staticmethod
  def tokenize_body(model: str, text: str) -> dict:
    return {"model": model, "prompt": text, "add_special_tokens": False}

  @staticmethod
  def tokens_of(resp: dict) -> list[int]:
    return list(resp["tokens"])

  @staticmethod
  def prompt_len(last: int, length: int) -> int:
    """Tokens sent to read position `last`: its next token too (entry last + 1)."""
    return min(last + 2, length)

  @staticmethod
  def body(model: str, ids: Sequence[int], text: str, k: int) -> dict:
    del text
    return {"model": model, "prompt": [int(i) for i in ids], "max_tokens": 1,
            "prompt_logprobs": k, "temperature": 0.0, "seed": 0}

  @staticmethod
  def parse(resp: dict, ids: Sequence[int], positions: Sequence[int], k: int, c: "Client",
            where: str) -> list[list[tuple[int, float]]]:
    del c
    entries = _choice(resp, where).get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) < len(ids):
      raise ServerError(f"teacher.server: {where}: the response has no prompt_logprobs for the "
                        f"{len(ids)} tokens sent")
    out = []
    for j in positions:
      e = entries[j + 1]
      if not isinstance(e, dict):
        raise ServerError(f"teacher.server: {where}: no prompt log-probs at position {j + 1}")
      ranked = sorted((int(v["rank"]), int(i), float(v["logprob"])) for i, v in e.items())
      out.append([(i, lp) for rank, i, lp in ranked if rank <= k][:k])
    return out


API = {LlamaCpp.name: LlamaCpp, Vllm.name: Vllm}


def _choice(resp: dict, where: str) -> dict:
  try:
    return resp["choices"][0]
  except (KeyError, IndexError, TypeError):
    raise ServerError(f"teacher.server: {where}: the response has no choices") from None


def _first_diff(a: Sequence, b: Sequence) -> int:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------------------------------------

class Client:
  """Requests to one served teacher (see the module docstring)."""

  def __init__(self, server: Server, tokenizer):
    if server.api not in API:
      raise UserError(f"config.teacher.server.api: expected one of {APIS}, got {server.api!r}")
    self.server, self.api, self.tok = server, API[server.api], tokenizer
    self.texts = token_texts(tokenizer) if server.api == "llama_cpp" else []
    self.index = text_index(self.texts)
    self._lock = threading.Lock()
    self.counts = {"requests": 0, "retries": 0, "bytes_sent": 0, "bytes_received": 0,
                   "ambiguous": 0}

  def count(self, **n: int) -> None:
    with self._lock:
      for key, v in n.items():
        self.counts[key] += v

  # -- transport ------------------------------------------------------------------------------
  def call(self, path: str, body: dict | None = None, where: str = "") -> dict:
    """GET (no body) or POST JSON `path`; retries 429/5xx/timeouts/refused connections."""
    s = self.server
    url = s.url + path
    data = None if body is None else json.dumps(body).encode()
    what = f"{'POST' if data else 'GET'} {url}" + (f" ({where})" if where else "")
    for attempt in range(s.retries + 1):
      req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                   headers={"Content-Type": "application/json"})
      try:
        with urllib.request.urlopen(req, timeout=s.timeout_s) as r:
          raw = r.read()
        self.count(requests=1, bytes_sent=len(data or b""), bytes_received=len(raw))
        try:
          return json.loads(raw)
        except ValueError:
          raise ServerError(f"teacher.server: {what}: the answer is not JSON") from None
      except urllib.error.HTTPError as e:
        detail = _error_text(e)
        if e.code not in RETRY_STATUS or attempt == s.retries:
          raise ServerError(f"teacher.server: {what}: HTTP {e.code}{detail}") from None
        reason = f"HTTP {e.code}"
      except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
              http.client.HTTPException) as e:
        reason = str(getattr(e, "reason", e)) or type(e).__name__
        if attempt == s.retries:
          raise ServerError(f"teacher.server.url: {url} unreachable after {s.retries + 1} "
                            f"tries ({reason})") from None
      self.count(retries=1)
      wait = s.backoff_s * 2 ** attempt * (0.5 + random.random())
      log.warning("%s: %s; retry %d of %d in %.1f s", what, reason, attempt + 1, s.retries, wait)
      time.sleep(wait)
    raise AssertionError("unreachable")

  # -- start-up checks ------------------------------------------------------------------------
  def check(self, k: int) -> None:
    """Reachable, serves `teacher.server.model`, accepts k log-probs and tokenizes as
    `config.tokenizer` does; one `ServerError` line otherwise. Nothing is written."""
    s = self.server
    models = self.call("/v1/models", where="list models")
    names = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
    if s.model not in names:
      raise ServerError(f"config.teacher.server.model: {s.model!r} is not served at {s.url} "
                        f"(it serves {names})")
    ours = self.tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    theirs = self.api.tokens_of(self.call(self.api.tokenize_path,
                                          self.api.tokenize_body(s.model, PROBE_TEXT),
                                          where="tokenizer probe"))
    if theirs != ours:
      raise ServerError(
          f"config.tokenizer: the served model tokenizes differently ({len(theirs)} vs "
          f"{len(ours)} tokens for a probe text, first difference at token "
          f"{_first_diff(theirs, ours)}); the store's ids would not be the student's")
    try:
      self.row(ours, [len(ours) - 2], k, "k probe")
    except ServerError as e:
      raise ServerError(f"config.extract.k: the server refused {k} log-probs per position "
                        f"(calibrate reads the top max(extract.k, {REPORT_K})): {e}") from None

  # -- top-k of the scored positions ----------------------------------------------------------
  def row(self, ids: Sequence[int], positions: Sequence[int], k: int,
          where: str) -> list[list[tuple[int, float]]]:
    """[(id, log-prob)] (at most k, descending) at each of `positions` of the row `ids`."""
    if min(positions) < 1:
      raise UserError(f"teacher.server: {where}: a scored position 0 (servers return no "
                      f"log-probs for the first token)")
    n = self.api.prompt_len(max(positions), len(ids))
    sent = [int(i) for i in ids[:n]]
    text = (self.tok.decode(sent, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if self.api is LlamaCpp else "")
    resp = self.call("/v1/completions", self.api.body(self.server.model, sent, text, k), where)
    return self.api.parse(resp, sent, positions, k, self, where)

  def topk_rows(self, arrays: dict[str, np.ndarray], k: int, answer_only: bool, desc: str,
                gather: bool = True) -> dict[str, np.ndarray]:
    """The served top-k at every scored position of `arrays`' rows, laid out as
    `infer.topk_rows` returns it: each process asks for its contiguous part of the rows (their
    indices in "row"); `gather` hands every process all rows."""
    import jax  # pylint: disable=import-outside-toplevel
    n = len(arrays["input_ids"])
    hosts, me = jax.process_count(), jax.process_index()
    per = -(-n // hosts)
    top = self._rows(arrays, np.arange(me * per, min(n, (me + 1) * per)), k, answer_only, desc)
    if not gather or hosts == 1:
      return top
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    pad = lambda x: np.concatenate([x, np.zeros((per - len(x),) + x.shape[1:], x.dtype)])
    every = {key: np.asarray(multihost_utils.process_allgather(pad(v), tiled=True))[:n]
             for key, v in top.items()}
    every["row"] = np.arange(n, dtype=np.int64)
    return every

  def _rows(self, arrays: dict[str, np.ndarray], rows: np.ndarray, k: int, answer_only: bool,
            desc: str) -> dict[str, np.ndarray]:
    ids_NxL = arrays["input_ids"]
    length = ids_NxL.shape[1]
    if answer_only:
      scored = [[int(arrays["answer_pos"][r])] for r in rows]
    else:
      scored = [np.flatnonzero(arrays["loss_mask"][r] > 0).tolist() for r in rows]
    ids_out = np.zeros((len(rows), length, k), np.int32)
    lp_out = np.full((len(rows), length, k), TAIL_FLOOR, np.float32)
    tail_out = np.zeros((len(rows), length), np.float32)

    def one(i: int):
      r = int(rows[i])
      if not scored[i]:
        return i, []
      row_len = int(arrays["attention_mask"][r].sum())
      return i, self.row(ids_NxL[r, :row_len], scored[i], k, f"{desc} row {r}")

    with concurrent.futures.ThreadPoolExecutor(self.server.concurrency) as pool:
      futures = [pool.submit(one, i) for i in range(len(rows))]
      try:
        for fut in log_lib.progress(concurrent.futures.as_completed(futures), desc=desc,
                                    total=len(futures)):
          i, per_position = fut.result()
          for j, pairs in zip(scored[i], per_position):
            pairs = sorted(pairs, key=lambda p: -p[1])
            for slot, (token, lp) in enumerate(pairs):
              ids_out[i, j, slot], lp_out[i, j, slot] = token, lp
            tail_out[i, j] = tail_logmass([lp for _, lp in pairs])
      except BaseException:
        for fut in futures:
          fut.cancel()
        raise
    return {"teacher_ids": ids_out, "teacher_logprobs": lp_out, "teacher_tail": tail_out,
            "row": rows.astype(np.int64)}


def tail_logmass(logprobs: Sequence[float]) -> float:
  """log(1 - sum exp(logprobs)) in float64, TAIL_FLOOR where nothing is left (the served
  top-k's mass at T = 1; exact up to the server's rounding of its log-probs)."""
  if not len(logprobs):
    return 0.0
  mass = float(np.exp(np.asarray(logprobs, np.float64)).sum())
  return float(max(np.log1p(-mass), TAIL_FLOOR)) if mass < 1 else TAIL_FLOOR


def _error_text(e: urllib.error.HTTPError) -> str:
  """': <the server's message>' from an error response (OpenAI style or FastAPI's detail)."""
  try:
    body = json.loads(e.read() or b"null")
  except (ValueError, OSError):
    return ""
  msg: Any = body
  if isinstance(body, dict):
    msg = body.get("error", body.get("detail", body.get("message", body)))
    if isinstance(msg, dict):
      msg = msg.get("message", msg)
  text = " ".join(str(msg).split())
  return f": {text[:300]}" if text else ""
