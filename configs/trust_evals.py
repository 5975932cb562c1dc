"""The trust study on a task of another kind (issue 25, study (b)): multiple-choice reasoning
from OpenAI's evals registry (PyPI `evals`, fetched into the cache), FIRST in the paper's regime.

    python -m first_jax.pipeline --config configs/trust_evals.py:seed=N   # student seed N

In-domain: QuaRTz (qualitative relationships in science, "Eric adds more resistors to the
series circuit. The resistance A: increases B: decreases"; 3,860 questions, 2 choices), split
once (data seed 0): train 2,354 / validation 501 / test 1,005. Out-of-domain, chosen with the task
before any result was seen, 500 each: SocialIQa (everyday social situations, 3 choices) and the
FCC amateur-radio Extra exam (technical knowledge, 4 choices): another kind of reasoning and a
knowledge test the teacher was not tuned on (FCC options can be long: max_len 192; every set
answers in 4 letter slots, QuaRTz's 2 choices and SocialIQa's 3 padded). Scoring: the softmax
over the answer letters, as every study. Teacher recipe, students, seeds and precision as configs/trust_vader.py.
"""
import os

from first_jax import config as config_lib

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
TASK = "quartz/samples.jsonl"
OOD = ("theory_of_mind/socialiqa/test.jsonl", "fcc_amateur_extra/samples.jsonl")


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  student_seed = int(args.pop("seed", 0))
  c = config_lib.load_file(_DEMO)  # model, optimizer and precision of the README job
  c.workdir = f"workdir/trust_evals/seed{student_seed}"
  c.data.source = "evals"
  c.data.task = TASK
  c.data.ood_tasks = OOD
  c.data.num_examples = 3860  # every question: train 2354 / validation 501 / test 1005
  c.data.validation, c.data.test = 0.13, 0.26
  c.data.num_ood_examples = 500
  c.data.shuffle_choices = True  # the letters carry no label meaning here
  c.data.max_len = 192
  c.finetune.length_buckets = c.distill.length_buckets = (64, 96, 128, 192)
  config_lib.trust_regime(c, student_seed)
  c.students = ("sft", "first", "kd")
  if student_seed == 0:
    c.students += ("sft_ls-choices",)
  return c
