"""The loss over a large vocabulary, four ways, on one GPU: transformers' model(**inputs).loss (the whole
(B, T, V) logits), ours (loss.causal_lm_loss: chunks of targeted tokens through the head, with a frozen head their
gradient computed in forward, HeadLoss), ours as a trained head runs it (the chunks recomputed in backward) and
liger-kernel's fused linear cross entropy (the gradient computed during forward, chunk by chunk; where liger-kernel
is installed), each on the same one-layer model of the shape with its head frozen, forward and backward. Reports the
median seconds of a forward and backward of the whole model and the peak allocated above the weights, with ratios
against transformers measured in the same run. Writes bench/results/<name>.json.
Usage: python bench/loss_vs_liger.py --shape llama3_8b --name loss_vs_liger_llama3_8b
"""
import argparse
import json
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from unittest import mock

import torch
import transformers

from common import GIB, SHAPES, add_output_args, save_result
from frugal_loraga import loss as loss_module
from frugal_loraga.data import IGNORE
from frugal_loraga.loss import causal_lm_loss


def transformers_loss(model, inputs):
    return model(**inputs).loss


def checkpointed_loss(model, inputs):
    with mock.patch.object(loss_module, "frozen_plain_head", lambda model, h: False):
        return causal_lm_loss(model, inputs)


def liger_loss(model, inputs):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    hidden = model.model(input_ids=inputs["input_ids"], use_cache=False)[0]
    targets = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=IGNORE)
    return LigerFusedLinearCrossEntropyLoss()(model.lm_head.weight, hidden.flatten(0, 1), targets.flatten())


def measure(loss_fn, model, inputs, repeats: int) -> dict:
    grad = model.model.layers[0].mlp.down_proj.weight
    times = []
    for i in range(repeats + 2):  # two warm-up passes
        grad.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = loss_fn(model, inputs)
        loss.backward()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    return {"seconds": statistics.median(times), "peak_above_weights_gib": peak,
            "loss": loss.item(), "grad_norm": grad.grad.float().norm().item()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    add_output_args(parser, None)
    args = parser.parse_args()
    kind, sizes = SHAPES[args.shape]
    config = getattr(transformers, kind)(num_hidden_layers=1, **sizes)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # a trainable weight upstream of the loss
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.max_length), device="cuda")
    inputs = {"input_ids": ids, "labels": ids}
    try:
        liger = version("liger-kernel")
    except PackageNotFoundError:
        liger = None
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape, "vocab": config.vocab_size,
              "tokens": f"{args.batch_size} x {args.max_length}", "liger_kernel": liger}
    methods = [("transformers", transformers_loss), ("ours_chunked", causal_lm_loss),
               ("ours_checkpointed", checkpointed_loss)] + ([("liger_fused", liger_loss)] if liger else [])
    for name, fn in methods:
        result[name] = measure(fn, model, inputs, args.repeats)
        print(name, result[name], flush=True)
    for name, _ in methods[1:]:
        result[name]["seconds_vs_transformers"] = result[name]["seconds"] / result["transformers"]["seconds"]
        result[name]["memory_vs_transformers"] = (result[name]["peak_above_weights_gib"]
                                                  / result["transformers"]["peak_above_weights_gib"])
    print(json.dumps(result), flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
