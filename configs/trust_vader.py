"""The trust study on VADER (issue 25, study (a)): FIRST in the paper's regime on data the
package embeds, the successor of the multiemo study (configs/trust.py).

    python -m first_jax.pipeline --config configs/trust_vader.py:seed=N   # student seed N

Data: all 4,200 of VADER's human-rated tweets as the 3-way choice of configs/demo.py (negative /
neutral / positive by the mean rating, |mean| <= 0.5 neutral), split once (data seed 0):
train 2,184 / validation 504 / test 1,512; out-of-domain 500 sentences each of VADER's movie-review,
Amazon product-review and NYT editorial snippets (chosen with the task, before any result).
Teacher: SmolLM2-135M-Instruct fine-tuned `finetune.epochs` epochs (3, the paper's) at lr 5e-5,
chosen on validation only: the calibrate stage checks the premise (teacher validation confidence
above accuracy, searched log_space t > 1) and stops the run when it fails
(`calibrate.require_premise`). Students: 10 of the pre-trained teacher's layers, as the demo;
every student 3 epochs (matched budget); `:seed=N` sets the students' batch order
(`distill.seed`), the split and the teacher stay seed 0's. bfloat16 matmuls as the demo.
"""
import os

from first_jax import config as config_lib

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  student_seed = int(args.pop("seed", 0))
  c = config_lib.load_file(_DEMO)  # seed 0: one split and one teacher for every student seed
  c.workdir = f"workdir/trust_vader/seed{student_seed}"
  c.data.num_examples = 4200  # every tweet: train 2184 / validation 504 / test 1512
  c.data.validation, c.data.test = 0.12, 0.36
  c.data.num_ood_examples = 500
  config_lib.trust_regime(c, student_seed)
  c.students = ("sft", "first", "kd")
  if student_seed == 0:
    c.students += ("sft_ls-choices",)
  return c
