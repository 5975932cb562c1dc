"""Smoke run: tiny random-init teacher and student sharing the real GPT-2 tokenizer, synthetic
multiple-choice data; every stage in well under a minute on 2 CPU cores. Used by the tests.
`:online`: the teacher inside the student's step, temperature searched there. `:text`: the same
questions as prompt/response text (options in the prompt, the answer word as the response), so
every response token is extracted, calibrated on, distilled and scored."""
from first_jax import config as config_lib


def get_config(arg: str = ""):
  c = config_lib.base()
  c.workdir = "workdir/smoke"
  c.tokenizer = "gpt2"
  c.data.source = "synthetic"
  c.data.synthetic_size = 480
  c.data.synthetic_kind = "categories"
  c.data.max_len = 48
  c.teacher.model = config_lib.model_block(hidden_size=64, num_layers=2)
  c.student.model = config_lib.model_block(hidden_size=32, intermediate_size=64, num_layers=1,
                                           num_heads=2, num_kv_heads=1)
  c.finetune.lr = 3e-3
  c.finetune.epochs = 3
  c.distill.lr = 3e-3
  c.distill.epochs = 2
  c.checkpoint.every_steps = 20
  c.students = ("sft", "kd", "first")
  if arg == "text":
    c.workdir = "workdir/smoke_text"
    c.data.kind = "text"
    c.data.synthetic_size = 240
    c.data.max_len = 40
    c.data.answer_template = "The answer is {answer}."
    c.distill.length_buckets = (24, 32, 40)
  if arg == "online":
    c.distill.mode = "online"
    c.distill.temperature = "search"
  return c
