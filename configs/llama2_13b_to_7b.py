"""Paper scale: Llama-2-13B-chat -> Llama-2-7B-chat (V = 32,000) on
instruction data; block 2048, k = 5, global batch 128, lr 2e-6, 3 epochs, cosine with 3% warmup.

Point the paths at local Hugging Face folders (config.json + safetensors) and the data at an
Alpaca-style JSONL (instruction / input / output):

    python -m first_jax.pipeline --config configs/llama2_13b_to_7b.py \\
        --config.teacher.path=/ckpt/Llama-2-13b-chat-hf \\
        --config.student.path=/ckpt/Llama-2-7b-chat-hf \\
        --config.tokenizer=/ckpt/Llama-2-13b-chat-hf --config.data.task=/data/alpaca.jsonl

For a real run the architecture is read from the checkpoints; the `model` blocks below hold the
same architecture so that `python -m first_jax.plan --config configs/llama2_13b_to_7b.py`
can size every program before any weight exists (see docs/scaling.md). Memory levers: bf16
params and compute, rematerialised layers scanned with `nn.scan`, gradient accumulation
(16 rows x 8 micro-steps = 128), an FSDP mesh over one 8-device host by default (other
meshes: `--config.mesh.data=2 --config.mesh.fsdp=8`, ...).
"""
from first_jax import config as config_lib

LLAMA2 = dict(model_type="llama", vocab_size=32000, rope_theta=1e4, rms_norm_eps=1e-5,
              tie_word_embeddings=False, attention_bias=False, max_position_embeddings=4096,
              dtype="bfloat16", param_dtype="bfloat16", remat=True, scan_layers=True)


def get_config(arg: str = ""):
  return config_lib.paper_scale(
      "llama2_13b_to_7b",
      teacher="/ckpt/Llama-2-13b-chat-hf", student="/ckpt/Llama-2-7b-chat-hf",
      teacher_model=config_lib.model_block(
          hidden_size=5120, intermediate_size=13824, num_layers=40,
          num_heads=40, num_kv_heads=40, head_dim=128, **LLAMA2),
      student_model=config_lib.model_block(
          hidden_size=4096, intermediate_size=11008, num_layers=32,
          num_heads=32, num_kv_heads=32, head_dim=128, **LLAMA2))
