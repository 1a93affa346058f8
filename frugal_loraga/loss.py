"""The causal LM loss without the whole vocabulary's logits: model(**inputs).loss, a chunk of tokens at a time.

transformers computes logits = head(h) for every token, (B, T, V) in fp32 (2 x 1024 x 128256 = 1 GiB for Llama-3,
plus its gradient and a bf16 copy). The loss only needs, for each token t with a target y_t = labels[t + 1] != -100,
    loss = (1 / N) sum_t CE(f(head(h_t)).float(), y_t),      N = the number of targets,
where h (B, T, H) are the decoder's final hidden states and f the family's post-processing (Gemma-2/3 soft-capping
c tanh(z / c), Cohere's scale, Granite's division). So: run the decoder, gather the N targeted rows of h (N, H), and
sum the CE over chunks of C rows, each through the head *module* (wrappers around it run per call), with
C = CHUNK_BYTES // (4 V): a chunk's fp32 logits are at most CHUNK_BYTES (HeadLoss's 16-bit logits: twice the rows).

Gradients, for a head that is a frozen nn.Linear without bias and a family without post-processing (LoRA training:
the head is not adapted): HeadLoss computes each chunk's gradient in h in forward, two GEMMs a chunk,
    G = (softmax(Z) - onehot(y)) / N,   Z = h W^T (C, V),   dL/dh = G W (C, H),
and keeps dL/dh (N, H) for backward; one kernel (kernels/cross_entropy.py) writes G over the chunk's 16-bit logits.
Otherwise each chunk runs under torch.utils.checkpoint (non-reentrant), which keeps only its (C, H) input and
recomputes its logits in backward, one chunk at a time: autograd then differentiates the very ops of the forward, so
the gradients of h, of the head's parameters (tied or wrapped) and of everything upstream are exact, for one more head
forward (2 N H V flops). Chunks are a multiple of 64 tokens where C allows, whole tiles of the GEMMs. liger-kernel's
fused linear cross entropy does what HeadLoss does with small chunks (64 tokens at Llama-3's sizes), slower than the
checkpointed chunks at 7-8B (bench/loss_vs_liger.py, bench/RESULTS.md).

Families whose forward is not logits = f(head(decoder(...)[0])) with ForCausalLMLoss and no auxiliary loss (or
unexpected inputs) fall back to model(**inputs).loss. With no target in a batch both give 0/0 = nan (zero gradients).
"""
from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForCausalLMLoss

from .data import IGNORE
from .kernels.cross_entropy import cross_entropy_grad_

log = logging.getLogger("frugal_loraga")
CHUNK_BYTES = 128 * 2**20  # fp32 logits of 256 tokens of Llama-3's 128256 words, 192 of Qwen2.5's 152064
DECODER_INPUTS = {"input_ids", "attention_mask", "position_ids", "inputs_embeds"}


def softcap(model, logits):
    c = model.config.final_logit_softcapping
    return logits if c is None else torch.tanh(logits / c) * c


def times_scale(model, logits):
    return logits * model.logit_scale


def over_scaling(model, logits):
    return logits / model.config.logits_scaling


# CausalLM classes whose forward is logits = head(hidden), then the function given (None: logits as they are).
FAMILIES = dict.fromkeys(
    "LlamaForCausalLM MistralForCausalLM MinistralForCausalLM Qwen2ForCausalLM Qwen3ForCausalLM GemmaForCausalLM "
    "Phi3ForCausalLM PhiForCausalLM OlmoForCausalLM Olmo2ForCausalLM Starcoder2ForCausalLM StableLmForCausalLM "
    "SmolLM3ForCausalLM Glm4ForCausalLM MixtralForCausalLM Qwen2MoeForCausalLM Qwen3MoeForCausalLM GPT2LMHeadModel "
    "GPTNeoXForCausalLM OPTForCausalLM FalconForCausalLM".split()) | {
    "Gemma2ForCausalLM": softcap, "Gemma3ForCausalLM": softcap,
    "CohereForCausalLM": times_scale, "Cohere2ForCausalLM": times_scale,
    "GraniteForCausalLM": over_scaling, "GraniteMoeForCausalLM": over_scaling}


def chunked(model, inputs: dict) -> bool:
    """Whether causal_lm_loss reproduces this model's loss chunk by chunk (else it calls the model)."""
    cls = type(model)
    return (cls.__name__ in FAMILIES and cls.__module__.startswith("transformers.") and "labels" in inputs
            and set(inputs) - {"labels"} <= DECODER_INPUTS and model.loss_function is ForCausalLMLoss
            and not getattr(model.config, "output_router_logits", False))  # MoE: the loss adds the router's


@cache
def note_fallback(name: str) -> None:
    log.info("%s: loss through model(**inputs).loss, with the whole vocabulary's logits", name)


def chunk_loss(model, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of the rows h (C, H) against targets y (C,)."""
    logits = model.lm_head(h)
    post = FAMILIES[type(model).__name__]
    if post is not None:
        logits = post(model, logits)
    return F.cross_entropy(logits.float(), y, reduction="sum")


def frozen_plain_head(model, h: torch.Tensor) -> bool:
    """Whether HeadLoss computes the loss of the rows h: the model's head a frozen nn.Linear without bias or hooks on
    h's device, no post-processing, and h needing a gradient."""
    head = model.lm_head
    return (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad and h.requires_grad
            and head.weight.device == h.device and not (head._forward_hooks or head._forward_pre_hooks)
            and FAMILIES[type(model).__name__] is None)


class HeadLoss(torch.autograd.Function):
    """The mean fp32 cross-entropy of the rows h (N, H) through a frozen head weight W (V, H) against targets y (N,),
    chunk rows at a time, each chunk's gradient in h computed in forward (module docstring)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        total = h.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(h)
        for i in range(0, len(y), chunk):
            logits = F.linear(h[i:i + chunk], weight)                               # Z (C, V)
            total += cross_entropy_grad_(logits, y[i:i + chunk], 1 / len(y)).sum()  # Z <- G
            grad[i:i + chunk] = (logits @ weight).to(h.dtype)
        ctx.save_for_backward(grad)
        return total / len(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grad, = ctx.saved_tensors
        return (grad.float() * grad_output).to(grad.dtype), None, None, None


def chunk_rows(model, logit_bytes: int, chunk_tokens: int | None) -> int:
    """The rows of a chunk: chunk_tokens, or as many as CHUNK_BYTES of logits of logit_bytes each hold, a multiple
    of 64 where that allows."""
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (logit_bytes * model.config.vocab_size))
    return chunk // 64 * 64 or chunk


def causal_lm_loss(model, inputs: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """model(**inputs).loss (labels shifted inside, -100 ignored, mean over targets) with the same gradients, holding
    at most chunk_tokens tokens' logits at a time (default: CHUNK_BYTES of logits, fp32 or HeadLoss's 16 bits)."""
    if not chunked(model, inputs):
        note_fallback(type(model).__name__)
        return model(**inputs).loss
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = model.base_model(**kwargs, use_cache=False)[0]  # (B, T, H)
    targets = F.pad(inputs["labels"][:, 1:], (0, 1), value=IGNORE).to(hidden.device)  # token t predicts label t+1
    keep = targets != IGNORE
    h, y = hidden[keep], targets[keep]  # (N, H), (N,)
    if torch.is_grad_enabled() and len(y) and frozen_plain_head(model, h):  # its logits in h's dtype, not fp32
        return HeadLoss.apply(h, model.lm_head.weight, y, chunk_rows(model, h.element_size(), chunk_tokens))
    chunk = chunk_rows(model, 4, chunk_tokens)
    total = h[:0].float().sum()  # 0 on the graph: no targets gives 0/0 = nan and zero gradients, as transformers
    for i in range(0, len(y), chunk):
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, model, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
        else:
            total = total + chunk_loss(model, h[i:i + chunk], y[i:i + chunk])
    return total / len(y)
