"""Llama-family decoder (Flax Linen) and its Hugging Face / GGUF weights I/O."""
from first_jax.models.config import ModelConfig
from first_jax.models.hf_io import (hf_to_params, iter_safetensors, load_pretrained, Model,
                                    params_to_hf, save_pretrained)
from first_jax.models.llama import (abstract_params, apply_fn, Decoder, init_params, layer_params,
                                    layer_subset, trim_vocab)

__all__ = [
    "Decoder", "Model", "ModelConfig", "abstract_params", "apply_fn", "hf_to_params", "init_params",
    "iter_safetensors", "layer_params", "layer_subset", "load_pretrained", "params_to_hf",
    "save_pretrained", "trim_vocab",
]
