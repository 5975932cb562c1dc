"""Text demo: FIRST on instruction data, every response token distilled (data.kind=text).

Teacher: SmolLM2-135M-Instruct (PyPI GGUF) fine-tuned on BIG-bench natural_instructions
subtask033 (Winogrande answer generation: fill the blank of a sentence with one of its two
objects, e.g. "movie."), the task definition left out (the inputs carry "Context Word" and
"Question"). Student: 10 of the PRE-TRAINED teacher's 30 layers. Out-of-domain text: two QASC
generation subtasks. Beside the text: BIG-bench general_knowledge (70 questions) scored by the
log-likelihood of each choice's text. Sized for 2 CPU cores (about 15 minutes a seed alone).
`:seed=N` picks the seed.
"""
from first_jax import config as config_lib

TASK = "natural_instructions/subtask033_winogrande_answer_generation"
OOD = ("natural_instructions/subtask041_qasc_answer_generation",
       "natural_instructions/subtask039_qasc_find_overlapping_words")


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = config_lib.base()
  c.seed = int(args.get("seed", 0))
  c.workdir = f"workdir/text_demo/seed{c.seed}"
  c.tokenizer = "smollm2"
  c.data.kind = "text"
  c.data.source = "bigbench"
  c.data.task = TASK
  c.data.use_task_prefix = False
  c.data.ood_tasks = OOD
  c.data.num_examples = 1300  # train 910 / validation 195 / test 195
  c.data.validation, c.data.test = 0.15, 0.15
  c.data.num_ood_examples = 200
  c.data.max_len = 64
  c.teacher.init = "pretrained"
  c.teacher.path = "smollm2"
  c.student.init = "layer_subset"
  c.student.layers = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)
  c.finetune.lr = 5e-5
  c.finetune.epochs = 1
  c.finetune.batch_size = 16
  c.finetune.warmup_ratio = 0.1
  c.distill.lr = 1e-4
  c.distill.epochs = 1
  c.distill.batch_size = 16
  c.distill.warmup_ratio = 0.1
  c.distill.length_buckets = (48, 64)
  c.extract.batch_size = 32
  c.evaluate.batch_size = 32
  c.evaluate.choice_tasks = ("general_knowledge",)
  c.evaluate.post_hoc_grid = (0.25, 4.0, 17)
  c.checkpoint.every_steps = 25
  c.students = ("sft", "kd", "first")
  return c
