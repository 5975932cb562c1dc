"""The main job (configs/demo.py) with its teacher behind an inference server (issue 27):

    python -m llama_cpp.server --model <SmolLM2 GGUF> --model_alias smollm2 --logits_all true \
        --port 8080 &                      # pip install -e '.[serve]'; docs/served_teacher.md
    python -m first_jax.pipeline --config configs/served.py[:url=http://host:port,model=NAME]

The server's top-k log-probs fill the store and the calibration (no finetune stage: whoever
serves the teacher fine-tuned it); the students, their data and evaluation are the demo's. Here
the served model is SmolLM2-135M-Instruct as the registry ships it (not fine-tuned), which is
what `bench.served_teacher` measures; serve your own fine-tuned teacher under another name.
`:api=vllm` reads vLLM's schema instead of llama-cpp-python's.
"""
import os

from first_jax import config as config_lib

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(arg: str = ""):
  args = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
  c = config_lib.load_file(_DEMO)
  c.workdir = "workdir/served"
  c.teacher.source = "server"
  c.teacher.server.url = args.get("url", "http://127.0.0.1:8080")
  c.teacher.server.model = args.get("model", "smollm2")
  c.teacher.server.api = args.get("api", "llama_cpp")
  return c
