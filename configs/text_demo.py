"""Text demo: FIRST on instruction data, every response token distilled (data.kind=text).

Teacher: SmolLM2-135M-Instruct (PyPI GGUF) fine-tuned on ToMi from OpenAI's evals registry
(PyPI `evals`, theory_of_mind/tomi: short stories of people moving objects, then "Where will X
look for the Y?", answered with one location, e.g. "pantry"; prompts of 63 tokens median, 94
longest). Student: 10 of the PRE-TRAINED teacher's 30 layers. Out-of-domain text: CREPE (how an
event changes the likelihood of another: "more likely" / "less likely" / "equally likely"; 99
tokens median, longer prompts cut from the left). Beside the text: SocialIQa's 3-way questions
from the same registry, scored by the log-likelihood of each choice's text. `:seed=N` picks the
seed.
Until 2026-12-06 this demo ran on BIG-bench natural_instructions (docs/results_text.md keeps that
run); PyPI no longer serves BIG-bench. The evals run has not been made yet.
"""
from first_jax import config as config_lib

TASK = "theory_of_mind/tomi/test.jsonl"
OOD = ("crepe/samples.jsonl",)


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = config_lib.base()
  c.seed = int(args.get("seed", 0))
  c.workdir = f"workdir/text_demo/seed{c.seed}"
  c.tokenizer = "smollm2"
  c.data.kind = "text"
  c.data.source = "evals"
  c.data.task = TASK
  c.data.ood_tasks = OOD
  c.data.num_examples = 1300  # train 910 / validation 195 / test 195
  c.data.validation, c.data.test = 0.15, 0.15
  c.data.num_ood_examples = 200
  c.data.max_len = 128
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
  c.distill.length_buckets = (64, 96, 128)
  c.extract.batch_size = 32
  c.evaluate.batch_size = 32
  c.evaluate.choice_tasks = ("theory_of_mind/socialiqa/test.jsonl",)
  c.evaluate.post_hoc_grid = (0.25, 4.0, 17)
  c.checkpoint.every_steps = 25
  c.students = ("sft", "kd", "first")
  return c
