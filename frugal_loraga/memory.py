"""Memory: what the estimate holds per layer, what the card has free, its default budget, and the peak a run will
reach, estimated from the model's config.json before the model loads.

The estimate's cost of a target layer W (m x n) over a batch of T tokens, e bytes an element of the compute dtype:
  gradient     its fp32 accumulator, 4 m n
  activations  its input and output, counted twice (the block's norms, attention and SwiGLU keep about as much again
               per layer): 2 T (m + n) e
The budget bounds the gradients and activations a group holds: grad_budget_gib, or by default half of what the card
has free after the weights and CUDA_HEADROOM_BYTES.

The peak of a dense decoder (h hidden, i intermediate, kv = KV heads x head dim, L layers, V vocabulary; targets
q, o: h x h; k, v: kv x h; gate, up: i x h; down: h x i), in bytes:
  weights    0.53 a linear parameter in NF4 (4 bits + double-quantized scales), else e; the head V h e, and the input
             embedding V h e too unless it sits in CPU memory (Config.embeddings_on_cpu, an untied head)
  estimate   the groups' share of the budget (as many whole blocks as it holds, or all of it for parts of a block) +
             CUDA_HEADROOM_BYTES (the loss's logit chunks, the block inputs in flight, the allocator's rounding)
  training   with gradient checkpointing, one hidden state T h e kept per layer and one layer recomputed,
             T (8h + 3i) e, beside its widest weight dequantized, i h e; without, every layer's T (8h + 3i) e; the
             loss's logit chunks, 3 CHUNK_BYTES (fp32 logits, their gradient, the e copy); the adapter, r (m + n)
             parameters a target at 28 bytes (A, B, A0, B0, the gradient and AdamW's two moments in fp32; 20 for
             plain LoRA, which has no A0, B0); TRAIN_SLACK_BYTES for the allocator's rounding
  peak       weights + the larger of the estimate and training (finetune hands the estimate's memory back first)
A model this does not describe (mixture-of-experts layers) gets a floor of its peak instead: its weights and its
adapter, counted on its skeleton (weights_estimate).
Training then spends what the card has left beyond that peak on layers that keep their activations, T (8h + 3i) e
each, rather than recompute them, and with what that leaves, on some of those layers keeping their 4-bit weights'
16-bit copies, e sum m n each, rather than dequantize them again in backward (keeping_plan).
Checked against bench/results/{llama2_7b,llama3_8b,qwen25_14b}_*gib.json (tests/test_memory.py).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from .config import Config
from .errors import ConfigError
from .experts import ExpertParameter, is_experts, stacks
from .experts_4bit import loads_stacks_in_4bit
from .lora import LINEAR, features, find_targets
from .loss import CHUNK_BYTES
from .models import model_skeleton, resolve_device, resolve_dtype

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.53
# What the default budget leaves free on CUDA beside its half: the loss's logit chunks, the block inputs in flight, and
# the allocator's rounding, which would otherwise take a small card past its size (an 8 GiB Llama-3-8B run reserved
# its whole 8 GiB without it). The app keeps as much free beside its estimate for the CUDA context and a display.
CUDA_HEADROOM_BYTES = GIB
TRAIN_SLACK_BYTES = GIB // 2


def gradient_bytes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The fp32 gradient accumulator of each layer (m x n, or E x m x n for an expert stack): 4 m n (E) bytes."""
    return {n: 4 * math.prod(shape) for n, shape in shapes.items()}


def activation_bytes(shapes: dict[str, tuple[int, ...]], tokens: int, element_size: int,
                     routes: Optional[dict[str, int]] = None, dequantized: frozenset = frozenset()
                     ) -> dict[str, int]:
    """The activations a layer (m x n) keeps for backward over a batch of `tokens`: its input and output, counted
    twice (the block's norms, attention and SwiGLU keep about as much again per layer); an expert stack's over the
    tokens' routes (routes[name]: the experts each token goes to, top-k), and, for a stack read dequantized (a 4-bit
    one: experts.dequantized), its copy E m n kept for dX."""
    routes = routes or {}
    return {n: (2 * tokens * routes.get(n, 1) * (shape[-2] + shape[-1]) + (math.prod(shape) if n in dequantized else 0))
            * element_size for n, shape in shapes.items()}


def layer_costs(shapes: dict[str, tuple[int, ...]], tokens: int, element_size: int,
                routes: Optional[dict[str, int]] = None) -> dict[str, int]:
    """Bytes the estimate holds per layer (m x n) for a batch of `tokens` when its block is tapped whole: its fp32
    gradient and its activations (routes: as activation_bytes takes them)."""
    activations = activation_bytes(shapes, tokens, element_size, routes)
    return {n: size + activations[n] for n, size in gradient_bytes(shapes).items()}


def available_ram_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def card() -> tuple[int, str]:
    """The memory a run on this machine gets, in bytes, and what it is: the GPU's total (what the app's Train finds
    once it has released the Try model), or the available RAM without a CUDA GPU."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return total, f"{torch.cuda.get_device_name()} with {total / 2**30:.1f} GiB"
    return available_ram_bytes(), "no CUDA GPU detected: the run uses the CPU"


def free_bytes(device: torch.device) -> int:
    """What a run can still take: GPU memory on CUDA (within any per-process cap), available RAM on CPU. On CUDA the
    blocks torch's allocator keeps cached but unused (an earlier run's, in the same process) count as free: a run
    reuses them, so a second run gets what the first one got."""
    if device.type != "cuda":
        return available_ram_bytes()
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    capped = total * torch.cuda.get_per_process_memory_fraction(device) - allocated
    return int(max(min(free + cached, capped), 0))


def default_budget_bytes(device: torch.device) -> int:
    """Half of what is free now (free_bytes), less CUDA_HEADROOM_BYTES on CUDA."""
    if device.type == "cuda":
        return int(max(free_bytes(device) - CUDA_HEADROOM_BYTES, 0) * 0.5)
    return int(free_bytes(device) * 0.5)


def decoder_shapes(model_config) -> Optional[dict[str, tuple[int, int]]]:
    """One dense decoder layer's target shapes (m, n) by name, or None for a model this estimate does not describe
    (no Llama-style sizes in its config, or mixture-of-experts layers)."""
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    experts = ("num_local_experts", "num_experts", "n_routed_experts")
    if not all(isinstance(getattr(model_config, n, None), int) for n in names) or \
            any(getattr(model_config, n, None) for n in experts):
        return None
    h, i, heads = model_config.hidden_size, model_config.intermediate_size, model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or h // heads
    kv = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    return {"q": (heads * head_dim, h), "k": (kv, h), "v": (kv, h), "o": (h, heads * head_dim),
            "gate": (i, h), "up": (i, h), "down": (h, i)}


def estimate_memory_gib(model_config, config: Config, card_bytes: Optional[int] = None) -> dict[str, float]:
    """GiB by part and the peak ("total"), for a dense decoder (decoder_shapes; ConfigError for others). card_bytes:
    what the run finds free (free_bytes); with it, the default LoRA-GA budget is half of what the weights and
    CUDA_HEADROOM_BYTES leave of it; without it, every layer's gradient counts."""
    shapes = decoder_shapes(model_config)
    if shapes is None:
        raise ConfigError(f"no memory estimate for {getattr(model_config, 'model_type', 'this model')}: it covers "
                          "dense decoders with Llama-style sizes in their config.json")
    h, i, layers, vocab = (model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers,
                           model_config.vocab_size)
    e = resolve_dtype(config, resolve_device(config)).itemsize
    tied = getattr(model_config, "tie_word_embeddings", False)
    tables = 1 if tied or config.embeddings_on_cpu else 2
    weights = (layers * sum(m * n for m, n in shapes.values()) * (NF4_BYTES_PER_PARAM if config.load_in_4bit else e)
               + tables * vocab * h * e)
    estimate = 0.0
    corrected = config.load_in_4bit and config.nf4_error_rank > 0  # nf4_error.py, within the same budget
    if config.init == "lora_ga" or corrected:
        block = sum(layer_costs(shapes, config.estimation_batch_size * config.max_length, e).values())
        if config.grad_budget_gib:
            budget = config.grad_budget_gib * GIB
        elif card_bytes:
            budget = max(card_bytes - weights - CUDA_HEADROOM_BYTES, 0) / 2
        else:
            budget = layers * block
        held = min(layers, budget // block) * block or budget  # groups of whole blocks, else parts of one
        estimate = held + CUDA_HEADROOM_BYTES
    tokens = config.batch_size * config.max_length
    layer = layer_activation_bytes(model_config, config)
    kept = tokens * h * e * layers + layer + i * h * e if config.gradient_checkpointing else layer * layers
    activations = kept + 3 * CHUNK_BYTES + TRAIN_SLACK_BYTES
    edges = layers * sum(m + n for m, n in shapes.values())
    adapter = adapter_bytes(edges, edges if corrected else 0, config)
    parts = {"weights": weights, "init_estimate": estimate, "training_activations": activations,
             "adapter_and_optimizer": adapter}
    result = {k: v / GIB for k, v in parts.items()}
    result["total"] = (weights + max(estimate, activations + adapter)) / GIB
    return result


def adapter_bytes(edges: int, corrected_edges: int, config: Config) -> int:
    """The adapter with its gradient and optimizer state, over the `edges` of its targets (a factor's numbers per unit
    of rank: m + n a layer, E (m + n) an expert stack): r numbers an edge at 28 bytes (A, B, A0, B0, the gradient and
    AdamW's two moments in fp32; 20 for plain LoRA, which has no A0, B0); and the 4-bit error's correction, q numbers
    an edge of the corrected layers at 4 bytes."""
    return (28 if config.init == "lora_ga" else 20) * config.rank * edges + 4 * config.nf4_error_rank * corrected_edges


def layer_activation_bytes(model_config, config: Config) -> int:
    """What a dense decoder layer keeps for backward over a training micro-batch of T tokens: T (8h + 3i) e."""
    tokens = config.batch_size * config.max_length
    e = resolve_dtype(config, resolve_device(config)).itemsize
    return tokens * (8 * model_config.hidden_size + 3 * model_config.intermediate_size) * e


def layer_weight_copy_bytes(model_config, config: Config) -> int:
    """The 16-bit copies of a dense decoder layer's 4-bit weights, e sum m n over its projections (0 without
    load_in_4bit): what a layer holds from forward to backward if it keeps them rather than dequantize them again."""
    if not config.load_in_4bit:
        return 0
    e = resolve_dtype(config, resolve_device(config)).itemsize
    return e * sum(m * n for m, n in decoder_shapes(model_config).values())


def keeping_plan(model_config, config: Config, free: Optional[int]) -> tuple[int, int]:
    """(a, w): a decoder layers keep their activations for backward rather than recompute them (their gradient
    checkpointing off), layer_activation_bytes each, and w of those also keep their 4-bit weights' 16-bit copies
    rather than dequantize them again in backward, layer_weight_copy_bytes each, in what is left once as many layers as
    fit keep their activations: keeping them saves a layer's whole forward, keeping the copies only its
    dequantizations. Both within the `free` bytes of the GPU (None without one) left once training with every layer
    checkpointed (estimate_memory_gib's training parts, the adapter counted whole though it is in memory by then) and
    CUDA_HEADROOM_BYTES are met, and within config.keep_activations_gib where set (without a GPU, only that). (0, 0)
    for a model this estimate does not describe, and for eager attention (it keeps T^2 a head)."""
    if decoder_shapes(model_config) is None or getattr(model_config, "_attn_implementation", None) == "eager":
        return 0, 0
    explicit = math.inf if config.keep_activations_gib is None else config.keep_activations_gib * GIB
    if free is None:
        budget = 0 if config.keep_activations_gib is None else explicit
    else:
        need = estimate_memory_gib(model_config, config)
        room = free - (need["training_activations"] + need["adapter_and_optimizer"]) * GIB - CUDA_HEADROOM_BYTES
        budget = min(explicit, room)
    layer, copy = layer_activation_bytes(model_config, config), layer_weight_copy_bytes(model_config, config)
    activations = int(min(max(budget // layer, 0), model_config.num_hidden_layers))
    weights = int(min(max((budget - activations * layer) // copy, 0), activations)) if copy else 0
    return activations, weights


def what_to_lower(estimate: dict[str, float], room_gib: float) -> str:
    """The setting behind the part of the estimate that sets its peak, for room_gib of memory; the weights need
    CUDA_HEADROOM_BYTES beside them."""
    if estimate["weights"] + CUDA_HEADROOM_BYTES / GIB > room_gib:
        return "turn load_in_4bit on if it is off, else pick a smaller model"
    if estimate["adapter_and_optimizer"] > max(estimate["init_estimate"], estimate["training_activations"]):
        return "lower rank, or adapt fewer layers (target_modules)"
    if estimate["init_estimate"] > estimate["training_activations"] + estimate["adapter_and_optimizer"]:
        return "lower estimation_batch_size or grad_budget_gib"
    return "lower batch_size or max_length (and keep gradient checkpointing on)"


def fit_advice(estimate: dict[str, float], card_gib: float, cuda: bool = True) -> str:
    """Whether the estimated peak fits a card of card_gib with CUDA_HEADROOM_BYTES to spare (cuda), or card_gib of
    RAM as it is, and if not, what to lower."""
    headroom = CUDA_HEADROOM_BYTES / GIB if cuda else 0.0
    room = card_gib - headroom
    if estimate["total"] <= room:
        spare = f", {headroom:.0f} GiB left for the CUDA context" if cuda else " of available RAM"
        return f"fits ({estimate['total']:.1f} of {card_gib:.1f} GiB{spare})"
    return (f"does not fit ({estimate['total']:.1f} GiB against {room:.1f} usable of {card_gib:.1f}): "
            f"{what_to_lower(estimate, room)}")


def check_fits(model_config, config: Config, free: int, skeleton: Optional[nn.Module] = None,
               targets: Optional[dict] = None) -> None:
    """ConfigError, before the model loads, when the estimated peak of a dense decoder is above the `free` bytes the
    run has (free_bytes); for other models, when what is known of it (weights_estimate of their skeleton and targets,
    where given) and CUDA_HEADROOM_BYTES are."""
    if decoder_shapes(model_config) is None:
        if skeleton is None:
            return
        estimate, held = weights_estimate(skeleton, config, targets or {})
        if estimate["total"] * GIB + CUDA_HEADROOM_BYTES > free:
            experts_off = held and config.load_in_4bit and not config.quantize_experts  # 16-bit stacks by choice
            advice = "turn quantize_experts on" if experts_off else what_to_lower(estimate, free / GIB)
            raise ConfigError(f"the weights of this model{held} and its adapter take about {estimate['total']:.1f} "
                              f"GiB before any activation, beside {CUDA_HEADROOM_BYTES / GIB:.0f} GiB for CUDA, and "
                              f"{free / GIB:.1f} GiB is free: {advice}")
        return
    estimate = estimate_memory_gib(model_config, config, free)
    if estimate["total"] * GIB > free:
        raise ConfigError(f"this run needs about {estimate['total']:.1f} GiB of memory at these settings and "
                          f"{free / GIB:.1f} GiB is free: {what_to_lower(estimate, free / GIB)}")


def weights_advice(model_config, config: Config, card_bytes: int, cuda: bool = True) -> str:
    """For a model estimate_memory_gib does not describe: whether its weights and adapter (weights_estimate, its
    targets found on its skeleton) fit card_bytes, as fit_advice says it."""
    skeleton = model_skeleton(model_config, config.trust_remote_code)
    estimate, held = weights_estimate(skeleton, config, find_targets(skeleton, config.target_list(), config.rank,
                                                                     config.init))
    return (f"no estimate of the peak for {getattr(model_config, 'model_type', 'this model')} (it covers dense "
            f"decoders); its weights{held} and adapter, before any activation: "
            f"{fit_advice(estimate, card_bytes / GIB, cuda)}")


def weights_estimate(skeleton: nn.Module, config: Config, targets: dict) -> tuple[dict[str, float], str]:
    """estimate_memory_gib's parts for a model it does not describe, the parts known: its weights (weight_bytes) and
    its targets' adapter (adapter_bytes), their sum a floor of the peak ("total"); and a note of the expert stacks
    the weights hold in 16 bits, if any."""
    weights, experts_16bit = weight_bytes(skeleton, config)
    edges = {name: math.prod(features(t)[:-2]) * sum(features(t)[-2:]) for name, t in targets.items()}
    corrected = config.load_in_4bit and config.nf4_error_rank > 0
    linear = sum(e for name, e in edges.items() if not isinstance(targets[name], ExpertParameter)) if corrected else 0
    adapter = adapter_bytes(sum(edges.values()), linear, config)
    estimate = dict(weights=weights / GIB, init_estimate=0.0, training_activations=0.0,
                    adapter_and_optimizer=adapter / GIB, total=(weights + adapter) / GIB)
    held = ""
    if experts_16bit:
        why = "quantize_experts is off" if config.load_in_4bit and not config.quantize_experts else \
            "this transformers cannot load them in 4 bits" if config.load_in_4bit else "load_in_4bit is off"
        held = f" ({experts_16bit / GIB:.1f} GiB of them mixture-of-experts expert stacks in 16 bits: {why})"
    return estimate, held


def weight_bytes(skeleton: nn.Module, config: Config) -> tuple[int, int]:
    """The bytes the weights of a model take once loaded, counted on its skeleton (models.model_skeleton): with
    load_in_4bit, linear layers but the output head, and expert stacks with quantize_experts (experts_4bit.py), at
    NF4_BYTES_PER_PARAM; every other parameter at the compute dtype's size; the input embedding left out where it sits
    in CPU memory (Config.embeddings_on_cpu, an untied head). And the part of them expert stacks hold in 16 bits."""
    e = resolve_dtype(config, resolve_device(config)).itemsize
    head, embedding = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    on_cpu = config.embeddings_on_cpu and head is not None and head.weight is not embedding.weight
    stack_ids = {id(m._parameters[p]) for m in skeleton.modules() if is_experts(m) for p in stacks(m)}
    four_bit = set()
    if config.load_in_4bit:
        four_bit = {id(m.weight) for m in skeleton.modules() if isinstance(m, LINEAR) and m is not head}
        four_bit |= stack_ids if config.quantize_experts and loads_stacks_in_4bit() else set()
    total = experts_16bit = 0
    for p in skeleton.parameters():
        if on_cpu and p is embedding.weight:
            continue
        size = p.numel() * (NF4_BYTES_PER_PARAM if id(p) in four_bit else e)
        total += size
        experts_16bit += size if id(p) in stack_ids and id(p) not in four_bit else 0
    return int(total), int(experts_16bit)
