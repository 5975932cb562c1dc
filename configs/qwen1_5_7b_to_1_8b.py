"""Paper scale: Qwen1.5-7B-Chat -> Qwen1.5-1.8B-Chat (the reference code's pair, V = 151,936) on
instruction data; block 2048, k = 5, global batch 128, lr 2e-6, 3 epochs, cosine with 3% warmup.

Point the paths at local Hugging Face folders (config.json + safetensors) and the data at an
Alpaca-style JSONL (instruction / input / output):

    python -m first_jax.pipeline --config configs/qwen1_5_7b_to_1_8b.py \\
        --config.teacher.path=/ckpt/Qwen1.5-7B-Chat --config.student.path=/ckpt/Qwen1.5-1.8B-Chat \\
        --config.tokenizer=/ckpt/Qwen1.5-7B-Chat --config.data.task=/data/alpaca.jsonl

For a real run the architecture is read from the checkpoints; the `model` blocks below hold the
same architecture so that `python -m first_jax.plan --config configs/qwen1_5_7b_to_1_8b.py`
can size every program before any weight exists (see docs/scaling.md). Memory levers: bf16
params and compute, rematerialised layers scanned with `nn.scan`, gradient accumulation
(16 rows x 8 micro-steps = 128), an FSDP mesh over one 8-device host by default (other
meshes: `--config.mesh.data=2 --config.mesh.fsdp=8`, ...).
"""
from first_jax import config as config_lib

QWEN = dict(model_type="qwen2", vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768,
            dtype="bfloat16", param_dtype="bfloat16", remat=True, scan_layers=True)


def get_config(arg: str = ""):
  return config_lib.paper_scale(
      "qwen1_5_7b_to_1_8b",
      teacher="/ckpt/Qwen1.5-7B-Chat", student="/ckpt/Qwen1.5-1.8B-Chat",
      teacher_model=config_lib.model_block(
          hidden_size=4096, intermediate_size=11008, num_layers=32,
          num_heads=32, num_kv_heads=32, head_dim=128, **QWEN),
      student_model=config_lib.model_block(
          hidden_size=2048, intermediate_size=5504, num_layers=24,
          num_heads=16, num_kv_heads=16, head_dim=128, **QWEN))
