"""Every config key, described once: its default, meaning, allowed values and the stages that
read it (`SCHEMA`); `base()` (every key at its default) is built from it."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections


_MISSING = object()


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


def leaves(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of every non-block key of `cfg`, in its order."""
  out = {}
  for name, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(leaves(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


def blocks(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of every block (ConfigDict) of `cfg`, parents first."""
  out = []
  for name, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += [f"{prefix}{name}"] + blocks(value, f"{prefix}{name}.")
  return out


def model_block(**fields: Any) -> ml_collections.ConfigDict:
  """A model architecture block (fields of first_jax.models.ModelConfig): the teacher's
  defaults, with `fields` changed."""
  return ml_collections.ConfigDict({**{n: k.default for n, k in _MODEL_FIELDS.items()},
                                    **fields})


def base() -> ml_collections.ConfigDict:
  """Every key a stage reads, with its default (`SCHEMA`). Experiment configs start here and
  override."""
  c = ml_collections.ConfigDict()
  for dotted, key in SCHEMA.items():
    *path, name = dotted.split(".")
    node = c
    for part in path:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[name] = key.default
  return c


# The stages that read config keys, in pipeline order (`pipeline` runs them all, so reads all).
STAGES = ("finetune", "extract", "calibrate", "sample", "train", "evaluate")
_ALL = STAGES


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key, described once: its default, what it means, what it may hold, which
  stages read it (`base()` is built from these).

  The type is the default's (`types` where several are accepted; `item`: the type of a tuple's
  items). `choices` (allowed values) and the range (`lo`/`hi`, open ends, `finite`, `also`:
  values allowed outside it; for a tuple, of each item; `min_len`: its fewest items) are checked
  by `check_key`; `allowed` words them where the generated wording would not do, or describes a
  rule `validate` checks itself.
  """
  default: Any
  doc: str
  stages: tuple[str, ...]
  choices: tuple = ()
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  finite: bool = False
  also: tuple = ()
  item: type | None = None
  min_len: int = 0
  allowed: str = ""
  types: tuple[type, ...] = ()

  @property
  def has_range(self) -> bool:
    return self.lo is not None or self.hi is not None or self.finite

  def expected(self, key: str) -> str:
    """The allowed values in words ("" where any value of the type will do)."""
    if self.allowed:
      return self.allowed
    if self.choices:
      return _or(self.choices)
    if not self.has_range:
      return ""
    whole = (self.item or _default_type(key)) is int
    lo_op, hi_op = (">" if self.lo_open else ">="), ("<" if self.hi_open else "<=")
    if self.lo is not None and self.hi is not None:
      text = (f"{_num(self.lo)} {'<' if self.lo_open else '<='} value {hi_op} "
              f"{_num(self.hi)}")
    elif self.lo is not None:
      text = f"{'an integer' if whole else 'a value'} {lo_op} {_num(self.lo)}"
    elif self.hi is not None:
      text = f"{'an integer' if whole else 'a value'} {hi_op} {_num(self.hi)}"
    else:
      text = "a finite value"
    if self.also:
      text += f" or {_or(self.also)}"
    return text


def _or(values: Sequence[Any]) -> str:
  words = [str(v) for v in values]
  return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _num(x: float) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


_MODEL_DOC = "(init=random only: a pre-trained model brings its own)"
# The fields of a model block (first_jax.models.ModelConfig), shared by teacher and student.
_MODEL_FIELDS = dict(
    model_type=Key("llama", f"architecture family {_MODEL_DOC}", (),
                   choices=("llama", "qwen2", "mistral")),
    vocab_size=Key(50257,
                   f"vocabulary size, >= the tokenizer's; the student's equals the teacher's "
                   f"(the top-k ids index both) {_MODEL_DOC}", (), lo=1),
    hidden_size=Key(64, f"model width {_MODEL_DOC}", (), lo=1),
    intermediate_size=Key(128, f"SwiGLU MLP width {_MODEL_DOC}", (), lo=1),
    num_layers=Key(2, f"decoder layers {_MODEL_DOC}", (), lo=1),
    num_heads=Key(4, f"query heads {_MODEL_DOC}", (), lo=1),
    num_kv_heads=Key(2,
                     f"key/value heads (grouped-query attention; divides num_heads) {_MODEL_DOC}",
                     (), lo=1),
    head_dim=Key(16, f"width of each attention head (even) {_MODEL_DOC}", (), lo=2),
    rope_theta=Key(10000.0, f"RoPE base frequency {_MODEL_DOC}", (), lo=0, lo_open=True),
    rms_norm_eps=Key(1e-05, f"epsilon of the RMS norms {_MODEL_DOC}", (), lo=0, lo_open=True),
    tie_word_embeddings=Key(True, f"the output head shares the embedding matrix {_MODEL_DOC}", ()),
    attention_bias=Key(False, f"q/k/v projections with a bias {_MODEL_DOC}", ()),
    max_position_embeddings=Key(2048,
                                f"longest position the model supports {_MODEL_DOC}", (), lo=1),
    dtype=Key("float32",
              "compute dtype of the matmuls: bfloat16 = bf16 operands accumulating in float32, "
              "forward and backward, with norms, softmax, activations between matmuls, losses "
              "and optimizer moments in float32 (applies to pre-trained models too)", (),
              choices=("float32", "bfloat16")),
    param_dtype=Key("float32", "parameter dtype (applies to pre-trained models too)", (),
                    choices=("float32", "bfloat16")),
    remat=Key(False, "recompute each layer's activations in the backward pass: less memory, more "
              "compute (applies to pre-trained models too)", ()),
    scan_layers=Key(True, f"`nn.scan` over the layers: one compiled layer, stacked parameters "
                    f"{_MODEL_DOC}", ()),
)

# The optimizer fields of `finetune` (the teacher) and `distill` (the students).
_OPTIM_FIELDS = dict(
    lr=Key(0.001, "peak learning rate (AdamW; linear warmup, then cosine decay to 0)", (), lo=0,
           lo_open=True, finite=True, allowed="a finite positive learning rate"),
    epochs=Key(1, "passes over the training split", (), lo=1),
    batch_size=Key(8, "rows per step over all devices (an update takes batch_size * grad_accum "
                   "rows)", (), lo=1),
    grad_accum=Key(1, "steps whose gradients are accumulated into one update", (), lo=1),
    warmup_ratio=Key(0.03,
                     "share of the updates spent warming the learning rate up from 0", (), lo=0,
                     hi=1, hi_open=True),
    weight_decay=Key(0.0, "AdamW weight decay", (), lo=0),
    clip_norm=Key(1.0, "gradients clipped to this global norm", (), lo=0, lo_open=True),
    b1=Key(0.9, "AdamW beta1", (), lo=0, hi=1, hi_open=True),
    b2=Key(0.999, "AdamW beta2", (), lo=0, hi=1, hi_open=True),
    eps=Key(1e-08, "AdamW epsilon", (), lo=0, lo_open=True),
)


def _block(prefix: str, fields: dict[str, Key], stages: tuple[str, ...],
           **defaults: Any) -> dict[str, Key]:
  """`fields` under `prefix`, read by `stages`, with other `defaults` where given."""
  return {f"{prefix}.{name}": dataclasses.replace(key, stages=stages,
                                                  default=defaults.get(name, key.default))
          for name, key in fields.items()}


_STUDENT = ("train", "evaluate")
_TEACHER_RUN = ("finetune", "extract", "sample", "train", "evaluate")  # + in the teacher's fingerprint

# Every config key, dotted, each described once: `base()` is built from these, in this order.
SCHEMA: dict[str, Key] = {
    "workdir": Key("workdir/run",
                   "everything a run writes: one folder per stage (see docs/design.md)", _ALL),
    "seed": Key(0, "the run's seed: data subsample and splits, choice shuffling, initialisation, "
                "batch order", _ALL, lo=0, hi=2**32, hi_open=True,
                allowed="an integer in [0, 2**32)"),
    "resume": Key(True, "true: skip finished stages and continue from the latest checkpoint "
                  "(training runs resume their data position too); false: start over, the "
                  "pipeline moving each stage's folder aside to <dir>.old-<unix time>",
                  ("finetune", "extract", "calibrate", "sample", "train", "evaluate")),
    "mesh.data": Key(-1, "data-parallel axis of the device mesh; -1: the remaining devices", _ALL,
                     lo=1, also=(-1,), allowed="a positive size or -1 (fill)"),
    "mesh.fsdp": Key(1, "parameter-sharding (FSDP) axis of the device mesh; -1: the remaining "
                     "devices", _ALL, lo=1, also=(-1,), allowed="a positive size or -1 (fill)"),
    "mesh.tensor": Key(1, "tensor-parallel axis of the device mesh; -1: the remaining devices",
                       _ALL, lo=1, also=(-1,), allowed="a positive size or -1 (fill)"),
    "mesh.on_indivisible": Key("error",
                               "a parameter dimension that its mesh axes do not divide (e.g. 9 "
                               "heads on tensor=2): error (naming the parameter) or replicate "
                               "(that one dimension, with a warning)", _ALL,
                               choices=("error", "replicate")),
    "tokenizer": Key("gpt2",
                     "the tokenizer of teacher and student: an asset name (gpt2, smollm2), a HF "
                     "tokenizer folder, a tokenizer.json or a .gguf", _ALL,
                     allowed="gpt2, smollm2 or an existing path"),
    # data
    "data.kind": Key("choice", "choice: multiple choice, one answer-letter token scored; text: "
                     "prompt/response pairs, every response token scored (instruction data, "
                     "generative BIG-bench tasks, or a choice task phrased as text through "
                     "data.answer_template)", _ALL, choices=("choice", "text")),
    "data.source": Key("synthetic",
                       "where examples come from: synthetic (generated), vader (VADER's "
                       "human-rated sentiment sentences, embedded in the package), evals (a data "
                       "file of the PyPI `evals` registry), bigbench (a BIG-bench task from a "
                       "local copy: $FIRST_JAX_BIGBENCH) or hf (HF `datasets`: a local file or a "
                       "hub name)", _ALL,
                       choices=("synthetic", "vader", "evals", "bigbench", "hf")),
    "data.task": Key("", "the in-domain task: a VADER domain (tweets, movie_reviews, "
                     "amazon_reviews, nyt_editorials) for vader; a registry data file (e.g. "
                     "quartz/samples.jsonl) for evals; a BIG-bench task name (e.g. "
                     "multiemo/hotels_sentence_en) or task.json path for bigbench; a local "
                     ".json/.jsonl/.parquet/.csv file or a hub dataset name for hf", _ALL),
    "data.neutral_band": Key(0.5, "source=vader: a sentence whose mean rating (-4..+4) lies within "
                             "+-this is neutral, below negative, above positive; each rater's "
                             "rating is classed by the same rule (the human label distribution)",
                             _ALL, types=(float, int), lo=0),
    "data.hf_split": Key("train", "source=hf: the split read (the run's own train/validation/test "
                         "splits are made from it)", _ALL),
    "data.hf_name": Key("", "source=hf: the hub dataset's configuration name (e.g. a task of "
                        "google/bigbench such as \"general_knowledge\"); \"\" for none",
                        _ALL),
    "data.hf_fields.input": Key("question",
                                "kind=choice, source=hf: the column of the question", _ALL),
    "data.hf_fields.choices": Key("choices",
                                  "kind=choice, source=hf: the column of the answer options (a "
                                  "list, or {\"text\": [...]}), or a list of columns, one per "
                                  "choice (CSV)", _ALL, types=(str, list)),
    "data.hf_fields.label": Key("answer",
                                "kind=choice, source=hf: the column of the gold answer (an "
                                "index, a letter, the text of one choice, or a list of one "
                                "score per choice: the unique best > 0)", _ALL),
    "data.text_fields.prompt": Key("instruction",
                                   "kind=text, source=hf: the column of the prompt (the "
                                   "defaults read Alpaca-style JSONL as it is)", _ALL),
    "data.text_fields.context": Key("input",
                                    "kind=text, source=hf: the column of the prompt's optional "
                                    "context, joined after a blank line", _ALL),
    "data.text_fields.response": Key("output",
                                     "kind=text, source=hf: the column of the response", _ALL),
    "data.answer_template": Key("{answer}", "kind=text: a choice example (BIG-bench target_scores, "
                                "synthetic, evaluate.choice_tasks) becomes the response "
                                "answer_template.format(answer=<choice text>), e.g. "
                                "\"Sentiment: {answer}\"", _ALL,
                                allowed="a template with an {answer} field"),
    "data.on_bad_example": Key("error",
                               "kind=text: a record without prompt or response is an error or "
                               "is skipped", _ALL, choices=("error", "skip")),
    "data.use_task_prefix": Key(True,
                                "BIG-bench: put the task's task_prefix before each input", _ALL),
    "data.ood_tasks": Key((), "tasks evaluated out-of-domain (same source and kind as data.task)",
                          _ALL, item=str),
    "data.num_examples": Key(0, "in-domain examples used: 0 all, else a seeded subsample", _ALL,
                             lo=0, allowed="0 (all) or a count"),
    "data.num_ood_examples": Key(0, "examples per out-of-domain task (and per "
                                 "evaluate.choice_tasks task): 0 all, else a seeded subsample",
                                 _ALL, lo=0, allowed="0 (all) or a count"),
    "data.validation": Key(0.1, "share of the examples in the validation split (disjoint from the "
                           "others, recorded in data/split.json; train is the rest)", _ALL,
                           allowed="> 0, with data.test summing to < 1"),
    "data.test": Key(0.2, "share of the examples in the test split", _ALL,
                     allowed="> 0, with data.validation summing to < 1"),
    "data.max_len": Key(64, "one padded sequence length (each step compiles once); longer examples "
                        "are truncated, with a warning counting them", _ALL, lo=2),
    "data.loss_on": Key("response",
                        "tokens that carry the loss: response (the answer / the response) or "
                        "all (plain language modelling; kind=choice only)", _ALL,
                        choices=("response", "all")),
    "data.use_chat_template": Key(False, "wrap each prompt in the tokenizer's chat template", _ALL),
    "data.shuffle_choices": Key(True, "shuffle each question's choices (BIG-bench lists the gold "
                                "choice first); keep false for a fixed label set", _ALL),
    "data.synthetic_size": Key(600, "source=synthetic: number of generated questions", _ALL, lo=1),
    "data.synthetic_kind": Key("numbers", "source=synthetic: the kind of toy question (see "
                               "first_jax.data.sources.synthetic_mcqa)", _ALL,
                               choices=("numbers", "categories")),
    # teacher / student
    "teacher.init": Key("random", "random (a new model from teacher.model) or pretrained (from "
                        "teacher.path), then fine-tuned", _TEACHER_RUN,
                        choices=("random", "pretrained")),
    "teacher.path": Key("", "init=pretrained: a local HF model folder (config.json + safetensors), "
                        "a .gguf file or an asset name (smollm2)", _TEACHER_RUN,
                        allowed="an existing HF model directory, .gguf file or asset name"),
    **_block("teacher.model", _MODEL_FIELDS, _ALL),
    "teacher.source": Key("local", "local: the teacher is fine-tuned and run in process; server: "
                          "an already fine-tuned teacher behind an inference server gives its "
                          "top-k log-probs over HTTP to extract and calibrate (no finetune; "
                          "students that need its full distribution are refused; see "
                          "docs/served_teacher.md)", _ALL, choices=("local", "server")),
    "teacher.server.url": Key("", "source=server: the server's base URL, e.g. "
                              "http://127.0.0.1:8000", ("extract", "calibrate"),
                              allowed="an http(s) URL when teacher.source=server"),
    "teacher.server.api": Key("llama_cpp", "source=server: its response schema: llama_cpp "
                              "(llama-cpp-python's server, tested) or vllm (vLLM's OpenAI server; "
                              "tested against its schema only)", _ALL,
                              choices=("llama_cpp", "vllm")),
    "teacher.server.model": Key("", "source=server: the served model's name (as its /v1/models "
                                "lists it); part of the teacher's identity: serve a changed "
                                "teacher under a new name", _ALL,
                                allowed="a non-empty name when teacher.source=server"),
    "teacher.server.concurrency": Key(4, "source=server: requests in flight at once (one row "
                                      "each)", ("extract", "calibrate"), lo=1),
    "teacher.server.timeout_s": Key(120.0, "source=server: seconds one request may take",
                                    ("extract", "calibrate"), lo=0, lo_open=True, finite=True),
    "teacher.server.retries": Key(3, "source=server: retries of a request answered 429 / 5xx, "
                                  "timed out or refused, with exponential backoff and jitter",
                                  ("extract", "calibrate"), lo=0),
    "teacher.server.backoff_s": Key(0.5, "source=server: the first retry's mean wait (doubled "
                                    "at each retry)", ("extract", "calibrate"), lo=0, finite=True),
    "student.init": Key("random", "random (from student.model), pretrained (from student.path) or "
                        "layer_subset (student.layers of the PRE-TRAINED teacher, with its "
                        "embeddings and head)", _STUDENT,
                        choices=("random", "pretrained", "layer_subset")),
    "student.path": Key("", "init=pretrained: a local HF model folder, a .gguf file or an asset "
                        "name", _STUDENT,
                        allowed="an existing HF model directory, .gguf file or asset name"),
    "student.layers": Key((), "init=layer_subset: the teacher layer indices kept", _STUDENT,
                          item=int),
    **_block("student.model", _MODEL_FIELDS, _STUDENT, hidden_size=32, intermediate_size=64,
             num_heads=2, num_kv_heads=1),
    # fine-tuning the teacher
    **_block("finetune", _OPTIM_FIELDS, ("finetune",)),
    "finetune.label_smoothing": Key(0.0,
                                    "label smoothing of the teacher's fine-tuning", ("finetune",),
                                    lo=0, hi=1, hi_open=True),
    "finetune.length_buckets": Key((), "as distill.length_buckets, for the teacher's fine-tuning "
                                   "batches", ("finetune",), item=int,
                                   allowed="lengths between 2 and data.max_len"),
    # distillation (the students)
    **_block("distill", _OPTIM_FIELDS, ("train",)),
    "distill.mode": Key("offline",
                        "offline: KD targets read from the top-k store; online: the teacher "
                        "runs inside the student's step (forward, top-k, rescale, loss in one "
                        "program)", ("train",), choices=("offline", "online")),
    "distill.tail": Key("bucket",
                        "the teacher's mass outside its top-k: bucket (a (k+1)-th bin on both "
                        "sides) or renormalize (compare over the k ids only); the default of "
                        "kd/first students (a -bucket/-renormalize suffix overrides it); "
                        "calibrate plots and records the headline temperature for it",
                        ("calibrate", "train"), choices=("bucket", "renormalize")),
    "distill.direction": Key("forward",
                             "KL direction of the KD loss: forward KL(teacher||student), "
                             "reverse KL(student||teacher) or jsd (Jensen-Shannon)", ("train",),
                             choices=("forward", "reverse", "jsd")),
    "distill.temperature": Key("calibrated",
                               "the teacher temperature of `first` students: calibrated (the "
                               "calibrate stage's search for the student's mode and tail, from "
                               "the store manifest), search (searched inside the online step; "
                               "needs distill.mode=online) or a number", ("train",),
                               types=(str, float),
                               allowed="calibrated, search or a positive number"),
    "distill.temperature_mode": Key("prob_softmax",
                                    "how `first` students re-scale the teacher's top-k with the "
                                    "temperature: prob_softmax = softmax(p / t) (the paper's "
                                    "code) or log_space = softmax(log p / t); the default mode "
                                    "of `first` (a -prob_softmax/-log_space suffix overrides it)",
                                    ("train",), choices=("prob_softmax", "log_space")),
    "distill.temperature_ema": Key(0.0, "online search: smoothing of the searched temperature over "
                                   "steps (0: none)", ("train",), lo=0, hi=1, hi_open=True),
    "distill.search_events": Key(1024,
                                 "online search: teacher events kept from the latest steps (a "
                                 "ring buffer)", ("train",), lo=1),
    "distill.search_min_events": Key(256, "online search: the start temperature is kept until this "
                                     "many events are in", ("train",), lo=0,
                                     allowed="0 <= value <= distill.search_events"),
    "distill.label_smoothing": Key(0.1,
                                   "label smoothing of the sft_ls student baseline", ("train",),
                                   lo=0, hi=1, hi_open=True),
    "distill.seed": Key(-1, "the students' seed (batch order, initialisation): -1 uses seed; >= 0 "
                        "gives student seeds over one teacher", ("train",), lo=0, also=(-1,),
                        allowed="-1 (the run's seed) or a seed >= 0"),
    "distill.length_buckets": Key((), "batch rows of similar length together and cut each batch's "
                                  "padding to the smallest of these lengths holding it (one "
                                  "compile each); (): every batch at data.max_len. Also cuts "
                                  "the padding of evaluation batches", ("train", "evaluate"),
                                  item=int, allowed="lengths between 2 and data.max_len"),
    # the top-k store
    "extract.k": Key(5, "teacher tokens kept per position (top-k); at most the vocabulary size",
                     ("extract", "calibrate", "train"), lo=1),
    "extract.logprob_dtype": Key("float16",
                                 "dtype the store keeps the top-k log-probs in",
                                 ("extract", "sample"), choices=("float16", "bfloat16")),
    "extract.batch_size": Key(16, "rows per teacher forward",
                              ("extract", "calibrate", "sample"), lo=1),
    "extract.shard_size": Key(256, "examples per store shard (finished shards are skipped on a "
                              "re-run)", ("extract", "sample"), lo=1),
    "extract.samples": Key(10, "tokens a sampled store keeps per position (students kd-sampled "
                           "and first-sampled: a priority sample of the teacher's full "
                           "distribution, see docs/math.md); 10 keeps its records within twice "
                           "the top-5 store's bytes", ("sample", "train"), lo=1),
    "extract.sample_seed": Key(0, "seed of the sampled stores' draws (each position draws from "
                               "its example's index, its position and this seed)",
                               ("sample", "train"), lo=0, hi=2**31, hi_open=True,
                               allowed="an integer in [0, 2**31)"),
    # the temperature search
    "calibrate.mode": Key("prob_softmax",
                          "which search's temperature the store records as its headline "
                          "`temperature` (every mode and tail is searched; each student "
                          "trains with the search for its own, see distill.temperature_mode)",
                          ("calibrate",), choices=("prob_softmax", "log_space")),
    "calibrate.num_bins": Key(10, "ECE bins of the temperature search (offline and online)",
                              ("calibrate", "train"), lo=1),
    "calibrate.refine": Key(True, "search a finer grid around the best coarse temperature",
                            ("calibrate",)),
    "calibrate.require_premise": Key(False, "stop before the students if the teacher is not "
                                     "over-confident on validation", ("calibrate",)),
    # evaluation
    "evaluate.batch_size": Key(32, "rows per scoring forward", ("evaluate",), lo=1),
    "evaluate.num_bins": Key((10, 15),
                             "ECE/MCE bin counts reported (equal width and equal mass each)",
                             ("evaluate",), item=int, lo=1, min_len=1,
                             allowed="a non-empty tuple of bin counts >= 1"),
    "evaluate.scoring": Key("choices",
                            "what confidence and correctness mean, in the temperature search, "
                            "the post-hoc fits and the headline metrics alike: choices = softmax "
                            "over the answer letters (lm-eval style); vocab = the "
                            "full-vocabulary top-1 (FIRST's reference code)",
                            ("calibrate", "train", "evaluate"), choices=("choices", "vocab")),
    "evaluate.post_hoc": Key(("sft", "first"),
                             "students also reported with post-hoc temperature scaling "
                             "(<student>+ts)", ("evaluate",), item=str),
    "evaluate.models": Key((), "extra HF model folders / .gguf files evaluated beside the "
                           "workdir's models", ("evaluate",), item=str,
                           allowed="existing HF model dirs or .gguf files"),
    "evaluate.choice_tasks": Key((), "kind=text: multiple-choice tasks also evaluated (BIG-bench "
                                 "task.json files or tasks, or with data.source=vader / evals "
                                 "that source's tasks), "
                                 "each choice scored by the log-likelihood of its text "
                                 "(data.answer_template) after the prompt", ("evaluate",),
                                 item=str, allowed="() for data.kind=choice"),
    "evaluate.post_hoc_grid": Key((0.25, 4.0, 33),
                                  "kind=text: post-hoc temperatures are chosen on this "
                                  "log-spaced grid (exact token NLL)", ("evaluate",), item=float,
                                  allowed="(lowest t > 0, highest t, number of points >= 2)"),
    # checkpoints and logs
    "checkpoint.every_steps": Key(50, "steps between checkpoints of a training run",
                                  ("finetune", "train"), lo=1),
    "checkpoint.keep": Key(2, "checkpoints kept per training run", ("finetune", "train"), lo=1),
    "checkpoint.after_done": Key("none",
                                 "what a finished training run keeps of its checkpoints (the "
                                 "export holds the weights): none, last (the newest step, "
                                 "optimizer state included, to continue training) or all",
                                 ("finetune", "train"), choices=("none", "last", "all")),
    "log_every_steps": Key(10, "steps between metric lines (metrics.jsonl, TensorBoard, log)",
                           ("finetune", "train"), lo=1),
    "students": Key(("sft", "kd", "first"),
                    "student variants trained and evaluated: sft, sft_ls[-choices], "
                    "kd[-mode][-tail], first[-mode][-tail], full_kd, each with an optional @E "
                    "(E epochs); see first_jax.train", ("train", "evaluate"), item=str),
}

# What each block is for (docs/config.md's section texts).
BLOCKS: dict[str, str] = {
    "mesh": "The device mesh `(data, fsdp, tensor)` over all devices of all processes; "
            "data*fsdp*tensor must equal the device count (one axis may be -1). See "
            "docs/launch.md.",
    "data": "The examples: where they come from, how they are split, encoded and scored.",
    "data.hf_fields": "Column names read for `data.kind=choice`, `data.source=hf`.",
    "data.text_fields": "Column names read for `data.kind=text`, `data.source=hf`.",
    "teacher": "The teacher before fine-tuning, or the served teacher.",
    "teacher.server": "A teacher behind an inference server (`teacher.source=server`).",
    "teacher.model": "Architecture (`first_jax.models.ModelConfig`) of a random teacher; for "
                     "`init=pretrained` the architecture comes from the checkpoint and only "
                     "dtype, param_dtype and remat apply.",
    "student": "The student's starting point.",
    "student.model": "Architecture of a random student (same fields as `teacher.model`); for "
                     "`init=pretrained` / `layer_subset` only dtype, param_dtype and remat "
                     "apply.",
    "finetune": "Supervised fine-tuning of the teacher (AdamW, warmup + cosine, clipping, "
                "accumulation).",
    "distill": "Training the students: the optimizer (as in `finetune`) and the distillation "
               "loss.",
    "extract": "The teacher's top-k store, and the sampled stores of the sample stage.",
    "calibrate": "The ECE-minimising temperature search on the validation split.",
    "evaluate": "Metrics of every model, in-domain and out-of-domain.",
    "checkpoint": "Orbax checkpoints of the training runs.",
}


_DEFAULTS: dict[str, Any] = {}


def defaults() -> dict[str, Any]:
  """{dotted key: default} of `base()`."""
  if not _DEFAULTS:
    _DEFAULTS.update(leaves(base()))
  return _DEFAULTS


def _default_type(key: str) -> type:
  value = defaults()[key]
  return tuple if isinstance(value, (tuple, list)) else type(value)


def type_name(key: str) -> str:
  """The key's type in words: `int`, `str`, `tuple[str]`, `str | float`."""
  spec = SCHEMA[key]
  if spec.types:
    return " | ".join(t.__name__ for t in spec.types)
  kind = _default_type(key)
  if kind is tuple:
    return f"tuple[{spec.item.__name__}]" if spec.item else "tuple"
  return kind.__name__


def _expected(key: str) -> str:
  return SCHEMA[key].expected(key)


def keys_for(stage: str) -> list[str]:
  """The keys `stage` reads, in base() order (`pipeline`: every key)."""
  return [k for k, spec in SCHEMA.items() if stage == "pipeline" or stage in spec.stages]


def format_default(value: Any) -> str:
  return repr(tuple(value)) if isinstance(value, (tuple, list)) else repr(value)
