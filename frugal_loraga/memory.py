"""A rough peak-memory estimate from the model's config.json and the run settings, shown before a run starts.

Per decoder layer of a Llama-style model (h hidden, i intermediate, kv = kv heads x head dim):
  linear params  P_l = 2 h^2 + 2 h kv + 3 h i      bytes: 0.53 each in NF4 (4 bits + double-quant scales), else dtype
  embeddings + head: 2 V h params in the compute dtype
  gradient state (LoRA-GA init): min(budget, 4 bytes x all target params)
  adapter: r (m + n) params per target, 20 bytes each (A, B, A0, B0, gradients, two Adam moments)
  activations with checkpointing: one hidden state (B T h) per layer kept + one layer recomputed (~ B T (8h + 3i))
    + logits B T V in fp32 twice (values and gradient); without checkpointing every layer's ~ B T (8h + 3i).
"""
from __future__ import annotations

from .config import Config
from .models import resolve_device, resolve_dtype

NF4_BYTES_PER_PARAM = 0.53


def estimate_memory_gib(model_config, config: Config) -> dict[str, float]:
    h, i, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    vocab = model_config.vocab_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or h // heads
    kv = getattr(model_config, "num_key_value_heads", heads) * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    dtype_bytes = resolve_dtype(config, resolve_device(config)).itemsize
    weights = layers * per_layer * (NF4_BYTES_PER_PARAM if config.load_in_4bit else dtype_bytes) + 2 * vocab * h * dtype_bytes
    gradients = 4 * layers * per_layer if config.init == "lora_ga" else 0
    if config.grad_budget_gib:
        gradients = min(gradients, config.grad_budget_gib * 2**30)
    tokens = config.batch_size * config.max_length
    layer_activations = tokens * (8 * h + 3 * i) * dtype_bytes
    kept = tokens * h * dtype_bytes * layers + layer_activations if config.gradient_checkpointing else layer_activations * layers
    activations = kept + 2 * tokens * vocab * 4
    adapter = 20 * layers * config.rank * (9 * h + 2 * kv + 3 * i)  # fp32 A, B, A0, B0, grads, two Adam moments
    parts = {"weights": weights, "gradient_state": gradients, "activations": activations, "adapter_and_optimizer": adapter}
    result = {k: v / 2**30 for k, v in parts.items()}
    result["total"] = (weights + activations + max(gradients, adapter)) / 2**30  # init, then training
    return result
