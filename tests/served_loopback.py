"""A loopback inference server for the served-teacher tests: it serves OUR JAX teacher (or any
`score(ids) -> log-probs [L, V]`) on 127.0.0.1 in a real server's response schema, so the client
(first_jax.engine.served) is tested in the default suite without llama.cpp or vLLM.

The schemas follow the real servers' code and the responses recorded from llama-cpp-python's
server (tests/fixtures/served/, checked against these by test_served):
- `llama_cpp`: /v1/models, /extras/tokenize, /v1/completions with echo + logprobs: top
  log-probs keyed by token TEXT, `top_logprobs[j]` the logits at position j (row 0 null), plus
  token j's own entry, one generated token.
- `vllm`: /v1/models, /tokenize, /v1/completions with the prompt as ids and prompt_logprobs
  (entry i: the distribution predicting token i, keyed by id, with ranks; `max_logprobs`).

Faults, for the transport tests: `fail` (statuses answered to the next requests, e.g. [503,
429]), `delay_s` (every completion waits), `die_after` (completions answered before the server
stops listening for good), `tokenize_shift` (a different tokenizer: every id + 1).
"""
from __future__ import annotations

import http.server
import json
import threading
import time
from typing import Callable, Sequence

import numpy as np

from first_jax.engine import served


class Loopback:
  def __init__(self, score: Callable[[Sequence[int]], np.ndarray], tokenizer, api: str,
               model: str = "teacher", max_logprobs: int = 20):
    self.score, self.tok, self.api, self.model = score, tokenizer, api, model
    self.max_logprobs = max_logprobs
    self.texts = served.token_texts(tokenizer)
    self.fail: list[int] = []
    self.delay_s = 0.0
    self.die_after: int | None = None
    self.tokenize_shift = 0
    self.completions = 0
    self.lock = threading.Lock()
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self) -> "Loopback":
    self.thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def stop(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()

  # -- the schemas ----------------------------------------------------------------------------
  def tokenize(self, text: str) -> list[int]:
    ids = self.tok(text, add_special_tokens=False)["input_ids"]
    return [i + self.tokenize_shift for i in ids]

  def models(self) -> dict:
    return {"object": "list", "data": [{"id": self.model, "object": "model",
                                        "owned_by": "me", "permissions": []}]}

  def completion(self, body: dict) -> tuple[int, dict]:
    if self.api == "llama_cpp":
      ids = self.tokenize(body["prompt"])
      k = body.get("logprobs")
      lp_LxV = self.score(ids)
      gen = int(np.argmax(lp_LxV[-1]))
      tokens = [self.texts[i] for i in ids]
      tops: list = []
      for j in range(len(ids)):  # llama-cpp-python: row j keyed by text, + token j's own entry
        top = {self.texts[i]: float(lp_LxV[j, i]) for i in top_ids(lp_LxV[j], k)}
        top.update({tokens[j]: float(lp_LxV[j, ids[j]])})
        tops.append(top)
      tops[0] = None
      token_lps: list = [float(lp_LxV[j, ids[j]]) for j in range(len(ids))]
      token_lps[0] = None
      offsets = list(np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist())
      return 200, {
          "id": "cmpl-loopback", "object": "text_completion", "created": int(time.time()),
          "model": self.model,
          "choices": [{"text": body["prompt"] + self.texts[gen], "index": 0,
                       "logprobs": {"tokens": tokens, "text_offset": offsets,
                                    "token_logprobs": token_lps, "top_logprobs": tops},
                       "finish_reason": "length"}],
          "usage": {"prompt_tokens": len(ids), "completion_tokens": 1,
                    "total_tokens": len(ids) + 1}}
    k = body.get("prompt_logprobs")
    if k is not None and k > self.max_logprobs:
      return 400, {"object": "error", "message": f"Requested prompt logprobs of {k}, which is "
                   f"greater than max allowed: {self.max_logprobs}", "type": "BadRequestError",
                   "param": None, "code": 400}
    ids = [int(i) for i in body["prompt"]]
    lp_LxV = self.score(ids)
    entries: list = [None]
    for i in range(1, len(ids)):  # entry i: the distribution predicting token i
      row = lp_LxV[i - 1]
      top = top_ids(row, k)
      keep = top + ([ids[i]] if ids[i] not in top else [])
      entries.append({str(t): {"logprob": float(row[t]), "rank": 1 + int((row > row[t]).sum()),
                               "decoded_token": self.texts[t]} for t in keep})
    return 200, {"id": "cmpl-loopback", "object": "text_completion",
                 "created": int(time.time()), "model": self.model,
                 "choices": [{"index": 0, "text": "", "logprobs": None,
                              "finish_reason": "length", "stop_reason": None,
                              "prompt_logprobs": entries}],
                 "usage": {"prompt_tokens": len(ids), "completion_tokens": 1,
                           "total_tokens": len(ids) + 1}}

  # -- HTTP -----------------------------------------------------------------------------------
  def _handler(self):
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        del args

      def _send(self, code: int, obj) -> None:
        raw = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

      def do_GET(self):
        if self.path == "/v1/models":
          return self._send(200, outer.models())
        return self._send(404, {"detail": "Not Found"})

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with outer.lock:
          if outer.fail:
            code = outer.fail.pop(0)
            return self._send(code, {"error": {"message": f"injected {code}", "code": code}})
        if self.path == "/v1/completions":
          with outer.lock:
            if outer.die_after is not None and outer.completions >= outer.die_after:
              threading.Thread(target=outer.stop, daemon=True).start()
              self.close_connection = True
              return None
            outer.completions += 1
          if outer.delay_s:
            time.sleep(outer.delay_s)
          code, obj = outer.completion(body)
          return self._send(code, obj)
        if self.path == "/extras/tokenize" and outer.api == "llama_cpp":
          return self._send(200, {"tokens": outer.tokenize(body["input"])})
        if self.path == "/tokenize" and outer.api == "vllm":
          ids = outer.tokenize(body["prompt"])
          return self._send(200, {"tokens": ids, "count": len(ids), "max_model_len": 2048})
        return self._send(404, {"detail": "Not Found"})

    return Handler


def top_ids(row_V: np.ndarray, k: int) -> list[int]:
  """The k largest entries' ids, descending (ties: lower id first, as lax.top_k)."""
  part = np.argpartition(-row_V, k - 1)[:k]
  return [int(i) for i in sorted(part, key=lambda i: (-row_V[i], i))]


def jax_scorer(model, length: int) -> Callable[[Sequence[int]], np.ndarray]:
  """`score(ids) -> float32 log-probs [len(ids), V]` of a first_jax model (one compile: rows
  padded on the right to `length`, which a causal model does not see)."""
  import jax
  import jax.numpy as jnp

  from first_jax import models

  apply = jax.jit(models.apply_fn(model.module))
  lock = threading.Lock()

  def score(ids: Sequence[int]) -> np.ndarray:
    n = len(ids)
    x = np.zeros((1, max(length, n)), np.int32)
    x[0, :n] = ids
    mask = (np.arange(x.shape[1]) < n)[None].astype(np.int32)
    with lock:
      logits = apply(model.params, jnp.asarray(x), jnp.asarray(mask))
      return np.asarray(jax.nn.log_softmax(logits[0, :n].astype(jnp.float32), axis=-1))

  return score
