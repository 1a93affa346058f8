"""Where a training step's time goes: our LoRA training against the PEFT QLoRA peer, step for step, on a model shape
(Llama-2-7B's by default) cut to a few decoder layers (each layer costs the same as in the full model), or whole.

Variants, each in the same process on the same batches (2 x max_length tokens, rank 8, paged AdamW 8-bit), named
peer or ours plus options joined by '+':
  peer          transformers + bitsandbytes NF4 + PEFT LoRA, prepare_model_for_kbit_training, checkpointing
  ours          frugal-loraga's training step (NF4, LoraLinear with the fused Triton adapter, bf16 autocast)
  +liger        liger-kernel's RMSNorm, SwiGLU, RoPE and fused linear cross entropy patched in;  +flce  just the last
  +nockpt       no gradient checkpointing;  +reentrant  (ours) reentrant checkpointing, as PEFT's default
  +noautocast   (ours) bf16 without autocast
  +compile      torch.compile on each decoder layer
liger and flce patch classes and modules for the rest of the process: put them last. (The Triton adapter against the
torch reference is bench/bench_kernels.py's.)
Writes ms/step, tokens/s and peak GiB per variant, and with --profile the top CUDA kernels and CPU ops of one step.
Usage: python bench/profile_train.py --layers 8 --variants peer ours ours+liger --profile
"""
import argparse
import gc
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from common import (RESULTS, SHAPES, make_data, make_model_dir, our_lora, peer_batches, peer_model, time_steps,
                    top_events, work_dir)

OPTIONS = {"liger", "flce", "nockpt", "reentrant", "noautocast", "compile"}


def liger(model, loss_only: bool) -> None:
    """Patch liger-kernel's Llama kernels into this model (for the peer: into the model under PEFT); loss_only: just
    its fused linear cross entropy."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply_liger_kernel_to_llama(rope=not loss_only, rms_norm=not loss_only, swiglu=not loss_only, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=base)


def ours(model_dir: Path, data: Path, max_length: int, options: set[str]):
    dtype = torch.float32 if "noautocast" in options else torch.bfloat16
    return our_lora(model_dir, data, max_length, "nockpt" not in options, "reentrant" in options, dtype)


def peer(model_dir: Path, options: set[str]):
    return (*peer_model(model_dir, checkpointing="nockpt" not in options), nullcontext)


def measure(name: str, model, optimizer, context, batches: list[dict], profile: bool) -> dict:
    def step(batch):
        with context():
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = time_steps(step, batches)
    if profile:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(batches[2])
            torch.cuda.synchronize()
        events = prof.key_averages()
        result["top_kernels_ms"] = top_events(events, "device_time_total")
        result["gpu_busy_ms"] = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1000
        result["top_cpu_self_ms"] = top_events(events, "self_cpu_time_total")
        result["cpu_ms_total"] = sum(e.self_cpu_time_total for e in events) / 1000
    print(name, json.dumps({k: v for k, v in result.items() if not k.startswith("top_")}), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2_7b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=["peer", "ours", "ours+liger", "peer+liger"],
                        help="peer or ours, each with options joined by '+' (see the module docstring)")
    parser.add_argument("--profile", action="store_true", help="add the top CUDA kernels of one step")
    parser.add_argument("--work", default="/tmp/profile_train", help="the folder for the model and data (a model "
                        "folder found there is reused; fit_card.py's --work shares its models)")
    parser.add_argument("--out", default=str(RESULTS / "profile_train.json"))
    args = parser.parse_args()
    for variant in args.variants:
        kind, *options = variant.split("+")
        if kind not in ("peer", "ours") or not OPTIONS.issuperset(options):
            parser.error(f"variant {variant}: peer or ours, then any of {', '.join(sorted(OPTIONS))} joined by '+'")
    work = work_dir(args.work)
    model_dir = make_model_dir(work / f"{args.shape}-{args.layers}", args.layers, args.shape)
    data = make_data(work / "data.jsonl", 2 * (args.steps + 3), words=900)
    batches = peer_batches(model_dir, data, 2 * (args.steps + 2), args.max_length, "cuda")
    results = {"device": torch.cuda.get_device_name(), "shape": args.shape, "layers": args.layers,
               "batch": f"2 x {args.max_length}", "rank": 8, "variants": {}}
    for variant in args.variants:
        kind, *options = variant.split("+")
        model, optimizer, context = (ours(model_dir, data, args.max_length, set(options)) if kind == "ours"
                                     else peer(model_dir, set(options)))
        if "liger" in options or "flce" in options:
            liger(model, loss_only="liger" not in options)
        if "compile" in options:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            for layer in base.model.layers:
                layer.compile()
        results["variants"][variant] = measure(variant, model, optimizer, context, batches, args.profile)
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
