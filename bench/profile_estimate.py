"""Where the LoRA-GA estimate's time and memory go on the Llama-2-7B-shaped NF4 model (run on the GPU).

block     one decoder layer with all 7 targets tapped: activation bytes kept for backward per 2 x 1024 tokens (memory
          held by the forward's outputs and graph), eager and compiled, against layer_costs' count
estimate  the whole estimate over --samples examples, --runs times in a row (the first compiles): seconds per group,
          the SVDs' seconds, peak memory per group, and where compiling went (dynamo's compile_times and counters)
Usage: python bench/profile_estimate.py --card-gib 24 --samples 32 [--grad-budget-gib 1.4] [--host-budget-gib 8]
       [--no-block] [--min-words 100] [--max-words 900] [--one-width] [--eager] [--warm-pool] [--stacks]
  --host-budget-gib  how many lower groups' start inputs are kept on the CPU, trading the copies for no-grad runs of
                     the blocks between
  --min-words        examples of min-words to max-words (900) words, of varying lengths as real data has
  --one-width        every estimation batch padded to the longest one's width (as before session 9: one width, so
                     compiled for that width, with cuDNN's attention), not each to its own
Run it with TORCHINDUCTOR_CACHE_DIR set to an empty folder for the compile time of a first run on a fresh machine.
"""
import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from common import GIB, add_output_args, add_words_args, cap_card, make_model_dir, save_result, words_data, work_dir
from stacks import StackSampler
from frugal_loraga import Config
from frugal_loraga.init import estimation_batches
from frugal_loraga.blocks import (block_layout, compile_blocks, enable_checkpointing, start_compile_workers,
                                  uncompile_blocks)
from frugal_loraga.data import IGNORE, load_examples
from frugal_loraga.estimate import GradientTap, estimate_gradient_svd
from frugal_loraga.estimate.inputs import block_inputs, run_blocks
from frugal_loraga.memory import default_budget_bytes, layer_costs
from frugal_loraga.lora import find_targets, replace
from frugal_loraga.models import load_model


def block_activations(model, targets, batch) -> dict:
    """Bytes a tapped decoder layer keeps from forward to backward, for its inputs as the model gives them."""
    blocks, index = block_layout(model, list(targets))
    names = [n for n in targets if index[n] == 0]
    taps = {n: GradientTap(targets[n]) for n in names}
    replace(model, taps)
    for n, tap in taps.items():
        tap.accumulator = torch.zeros(tap.base.out_features, tap.base.in_features, device="cuda")
    args, kwargs = block_inputs(model, blocks[0], batch)
    hidden = args[0] if args else kwargs["hidden_states"]
    result = {"layer_costs_activation_gib": sum(layer_costs({n: (t.base.out_features, t.base.in_features)},
                                                            hidden.shape[0] * hidden.shape[1], 2)[n]
                                                - 4 * t.base.out_features * t.base.in_features
                                                for n, t in taps.items()) / GIB}
    for label in ("eager", "compiled", "compiled_again"):
        if label == "compiled":
            compile_blocks(blocks[:1])
        run_blocks(blocks[:1], hidden, [(args, kwargs)]).sum().backward()  # warm-up (and compile)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run_blocks(blocks[:1], hidden, [(args, kwargs)])
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        start = time.perf_counter()
        out.sum().backward()
        torch.cuda.synchronize()
        result[label] = {"held_after_forward_gib": held / GIB,
                         "peak_over_start_gib": (torch.cuda.max_memory_allocated() - before) / GIB,
                         "backward_ms": 1000 * (time.perf_counter() - start)}
        del out
    uncompile_blocks(blocks[:1])
    replace(model, targets)
    return result


def estimate(model, targets, batches, budget: int, host_budget, compile: bool, stacks: bool) -> dict:
    """The estimate (compiled unless --eager), timed per group and in its SVDs (EstimationStats.svd_seconds); stacks: with the functions the main thread spent most wall time in (a
    sampling profiler)."""
    group_marks = []

    batch_marks = []  # when each batch's backward returned (the CPU's view, no sync): per-width costs show here

    def progress(phase, done, total, metrics):
        if done == 0:  # the walk begins
            return
        batch_marks.append(time.perf_counter())
        if done == 1:
            for hook in hooks:
                hook.remove()
        if done % len(batches) == 0:  # the group's last batch: its SVDs come next
            torch.cuda.synchronize()
            group_marks.append((time.perf_counter(), torch.cuda.max_memory_allocated() / GIB))
            torch.cuda.reset_peak_memory_stats()

    blocks, _ = block_layout(model, list(targets))
    trace = []  # memory allocated after each block's forward, and each block's backward, in the first batch

    def mark(label: str) -> None:
        trace.append((label, torch.cuda.memory_allocated() / GIB))

    hooks = [b.register_forward_hook(lambda m, a, o, i=i: mark(f"fwd{i}")) for i, b in enumerate(blocks)]
    hooks += [b.register_full_backward_pre_hook(lambda m, g, i=i: mark(f"bwd{i}")) for i, b in enumerate(blocks)]
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with StackSampler() if stacks else contextlib.nullcontext() as sampler:
        _, stats = estimate_gradient_svd(model, targets, batches, 16, budget, "lowrank", progress, host_budget,
                                         compile=compile)
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    times = [t - s for (t, _), s in zip(group_marks, [start] + [t for t, _ in group_marks[:-1]])]
    compile_report = {"compile_times": torch._dynamo.utils.compile_times(repr="str", aggregate=True),
                      "counters": {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v}}
    torch._dynamo.utils.counters.clear()
    return {"seconds": total, **compile_report, "svd_seconds": stats.svd_seconds,
            "groups": len(stats.groups),
            "blocks_per_group": [len({n.split(".")[2] for n in g}) for g in stats.groups],
            "group_seconds": times, "group_peak_gib": [p for _, p in group_marks], "first_batch_trace": trace,
            "batch_seconds": [round(t - s, 4) for t, s in zip(batch_marks, [start] + batch_marks[:-1])],
            "allocator": {k: v for k, v in torch.cuda.memory_stats().items()
                          if k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")},
            **({"stacks": sampler.report()} if stacks else {})}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--card-gib", type=float, default=24)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--grad-budget-gib", type=float)
    parser.add_argument("--host-budget-gib", type=float, help="CPU memory for kept block inputs (default: a quarter "
                        "of the available RAM)")
    parser.add_argument("--runs", type=int, default=2, help="estimates in a row (the first compiles)")
    parser.add_argument("--no-block", action="store_true", help="skip the one-block activation measurement")
    add_words_args(parser)
    parser.add_argument("--one-width", action="store_true", help="every estimation batch padded to the longest "
                        "one's width (compiled for that width, with cuDNN's attention), not each to its own")
    parser.add_argument("--eager", action="store_true", help="the estimate's blocks not compiled")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="SDPA may not pick cuDNN's attention "
                        "(which plans anew for each new sequence length)")
    parser.add_argument("--warm-pool", action="store_true", help="start the compile workers before the model loads, "
                        "as finetune does")
    parser.add_argument("--stacks", action="store_true", help="sample the main thread's stack: where each estimate's "
                        "wall time goes")
    add_output_args(parser, "profile_estimate", work="/tmp/bench7b")
    args = parser.parse_args()
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    work = work_dir(args.work)
    model_dir = make_model_dir(work / "llama7b", 32)
    data = words_data(work, max(args.samples, 64) + 16, args)
    cap_card(args.card_gib)
    config = Config(model=str(model_dir), data=str(data), data_format="text", rank=8, max_length=1024,
                    estimation_samples=args.samples, progress=False)
    start = time.perf_counter()
    if args.warm_pool:
        start_compile_workers()
    model, tokenizer, device = load_model(config)
    load_seconds = time.perf_counter() - start
    enable_checkpointing(model)
    examples, _ = load_examples(config.data, "text", tokenizer, 1024)
    targets = find_targets(model, config.target_list(), 8, "lora_ga")
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device)
    if args.one_width:
        width = max(b["input_ids"].shape[1] for b in batches)
        batches = [{"input_ids": F.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]),
                                       value=tokenizer.pad_token_id),
                    "labels": F.pad(b["labels"], (0, width - b["labels"].shape[1]), value=IGNORE)} for b in batches]
    widths = [b["input_ids"].shape[1] for b in batches]
    results = {"device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "samples": args.samples,
               "min_words": args.min_words, "max_words": args.max_words, "one_width": args.one_width,
               "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled(),
               "tokens": sum(int((b["labels"] != -100).sum()) for b in batches),
               "padded_tokens": sum(b["input_ids"].numel() for b in batches), "compiled": not args.eager,
               "distinct_widths": len(set(widths)), "width_range": [min(widths), max(widths)],
               "model_gib": torch.cuda.memory_allocated() / GIB, "load_seconds": load_seconds,
               "warm_pool": args.warm_pool}
    if not args.no_block:
        results["block"] = block_activations(model, targets, batches[0])
    print(json.dumps(results, indent=1), flush=True)
    budget = int(args.grad_budget_gib * GIB) if args.grad_budget_gib else default_budget_bytes(device)
    results["budget_gib"] = budget / GIB
    host_budget = int(args.host_budget_gib * GIB) if args.host_budget_gib is not None else None
    results["host_budget_gib"] = args.host_budget_gib
    results["estimates"] = []
    for _ in range(args.runs):
        results["estimates"].append(estimate(model, targets, batches, budget, host_budget, not args.eager,
                                                args.stacks))
        print(json.dumps({k: v for k, v in results["estimates"][-1].items()
                          if k not in ("first_batch_trace", "stacks")}), flush=True)
    save_result(args.name, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
