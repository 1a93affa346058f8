"""A rough peak-memory estimate from the model's config.json and the run settings, shown before a run starts.

Per decoder layer of a Llama-style model (h hidden, i intermediate, kv = kv heads x head dim), all linear layers
adapted:
  linear layers  q, o: h x h;  k, v: kv x h;  gate, up: i x h;  down: h x i
  weights        0.53 bytes a parameter in NF4 (4 bits + double-quant scales), else the dtype's; plus embeddings
                 and head, 2 V h parameters in the compute dtype
  LoRA-GA init   whole layers of the estimate's cost (gradients.layer_costs: fp32 gradients and activations) up to
                 the budget: grad_budget_gib, else half of what the weights leave of the card (the engine's default);
                 plus the logits, B T V in fp32 twice (values and gradient)
  training       one hidden state (B T h) kept per layer with checkpointing + one layer recomputed (~ B T (8h + 3i)),
                 without checkpointing every layer's ~ B T (8h + 3i); the logits; the adapter, r (m + n) parameters
                 per target at 20 bytes each (A, B, A0, B0, gradients, two Adam moments)
The peak is the weights plus the larger of the two phases. Checked against the Llama-2-7B runs in bench/results.
"""
from __future__ import annotations

from typing import Optional

from .config import Config
from .gradients import layer_costs
from .models import resolve_device, resolve_dtype

NF4_BYTES_PER_PARAM = 0.53
HEADROOM_GIB = 1.0  # what a real card keeps beside a run: the CUDA context, a display


def estimate_memory_gib(model_config, config: Config, card_bytes: Optional[int] = None) -> dict[str, float]:
    """GiB by part and in total. card_bytes: the memory the run gets (GPU memory, or RAM on CPU); with it, the
    default LoRA-GA budget is taken into account, without it every layer's gradient counts."""
    h, i, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    vocab = model_config.vocab_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or h // heads
    kv = getattr(model_config, "num_key_value_heads", heads) * head_dim
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    per_layer = sum(m * n for m, n in shapes.values())
    dtype_bytes = resolve_dtype(config, resolve_device(config)).itemsize
    weights = layers * per_layer * (NF4_BYTES_PER_PARAM if config.load_in_4bit else dtype_bytes) + 2 * vocab * h * dtype_bytes
    init = 0.0  # the LoRA-GA estimate
    if config.init == "lora_ga":
        estimation_tokens = config.estimation_batch_size * config.max_length
        block = sum(layer_costs(shapes, estimation_tokens, dtype_bytes).values())
        budget = (config.grad_budget_gib * 2**30 if config.grad_budget_gib
                  else (card_bytes - weights) / 2 if card_bytes else layers * block)
        init = min(layers, max(1, int(budget // block))) * block + 2 * estimation_tokens * vocab * 4
    tokens = config.batch_size * config.max_length
    layer_activations = tokens * (8 * h + 3 * i) * dtype_bytes
    kept = tokens * h * dtype_bytes * layers + layer_activations if config.gradient_checkpointing else layer_activations * layers
    activations = kept + 2 * tokens * vocab * 4
    adapter = 20 * layers * config.rank * sum(m + n for m, n in shapes.values())
    parts = {"weights": weights, "init_estimate": init, "training_activations": activations,
             "adapter_and_optimizer": adapter}
    result = {k: v / 2**30 for k, v in parts.items()}
    result["total"] = (weights + max(init, activations + adapter)) / 2**30
    return result


def fit_advice(estimate: dict[str, float], card_gib: float) -> str:
    """Whether the estimated peak fits a card of card_gib with HEADROOM_GIB to spare, and if not, what to lower: the
    setting behind the part that sets the peak."""
    room = card_gib - HEADROOM_GIB
    if estimate["total"] <= room:
        return f"fits ({estimate['total']:.1f} of {card_gib:.1f} GiB, {HEADROOM_GIB:.0f} GiB left for the CUDA context)"
    if estimate["weights"] > room:
        change = "turn on 4-bit, or pick a smaller model"
    elif estimate["init_estimate"] > estimate["training_activations"] + estimate["adapter_and_optimizer"]:
        change = "lower estimation_batch_size or grad_budget_gib"
    else:
        change = "lower batch_size or max_length (and keep gradient checkpointing on)"
    return f"does not fit ({estimate['total']:.1f} GiB against {room:.1f} usable of {card_gib:.1f}): {change}"
