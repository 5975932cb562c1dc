"""The trust study: FIRST in the paper's regime, an over-confident fine-tuned teacher.

    bash bench/run_trust.sh [SEED ...]      # a seed at a time; then docs/results.md + summary.json

One teacher (SmolLM2-135M-Instruct fine-tuned 3 epochs, as in the paper, on 2,200 BIG-bench
multiemo hotel sentences; data split and teacher seed 0) and student seeds over it (`:seed=N`
sets `distill.seed`, the students' batch order; the split and the teacher's calibrated store are
shared: the runner restores the store from docs/results/teacher/). Evaluation: 1,100 validation and 2,200 in-domain test
questions, 500 per out-of-domain task. Confidence and correctness are the softmax over the four
answer letters (`evaluate.scoring=choices`) in the temperature search, the post-hoc scaling fits
and the evaluation alike. Every student trains the same 3 epochs (matched budget). The calibrate
stage checks the premise (teacher validation confidence above accuracy, searched log_space t > 1)
and stops if it fails; the report prints it first. FIRST here scales in log space (t = 1 is the
teacher as it is); the paper's prob_softmax is `first-prob_softmax`.
"""
import os

from first_jax import config as config_lib

# the first study's data (BIG-bench multiemo, from a local copy since PyPI stopped serving it)
_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiemo.py")


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  student_seed = int(args.pop("seed", 0))
  c = config_lib.load_file(_DEMO)  # seed 0: one split and one teacher for every student seed
  c.workdir = f"workdir/trust/seed{student_seed}"
  c.data.num_examples = 5500  # train 2200 / validation 1100 / test 2200
  c.data.validation, c.data.test = 0.2, 0.4
  c.data.num_ood_examples = 500
  config_lib.trust_regime(c, student_seed)
  c.finetune.length_buckets = ()  # the teacher as fine-tuned for docs/results/teacher/
  c.distill.length_buckets = (64, 80, 96)  # students: batches of similar length, less padding
  # Seeds >= 1 train the rows the goal compares and kd (sft+ts and first+ts are post-hoc fits of
  # sft and first), so that a seed fits a 3-hour session on 2 cores. Seed 0 also trains the label
  # smoothing baselines and sft@1 / sft@2, whose validation NLL chooses the SFT epoch count
  # (row sft@val; seed 0's chose the fixed 3 epochs every student gets).
  c.students = ("sft", "first", "kd")
  if student_seed == 0:
    c.students += ("sft_ls-choices", "sft_ls", "sft@1", "sft@2")
  return c
