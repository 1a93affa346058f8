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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
import frugal_loraga.gradients as gradients  # noqa: E402
from bench_7b import make_data, make_model_dir  # noqa: E402
from stacks import StackSampler  # noqa: E402
from frugal_loraga import Config  # noqa: E402
from frugal_loraga.api import estimation_batches  # noqa: E402
from frugal_loraga.blocks import block_layout, compile_blocks, start_compile_workers, uncompile_blocks  # noqa: E402
from frugal_loraga.data import IGNORE, load_examples  # noqa: E402
from frugal_loraga.gradients import GradientTap  # noqa: E402
from frugal_loraga.memory import default_budget_bytes, layer_costs  # noqa: E402
from frugal_loraga.lora import find_targets, replace  # noqa: E402
from frugal_loraga.models import load_model  # noqa: E402

GIB = 2**30


def block_activations(model, targets, batch) -> dict:
    """Bytes a tapped decoder layer keeps from forward to backward, for its inputs as the model gives them."""
    blocks, index = block_layout(model, list(targets))
    names = [n for n in targets if index[n] == 0]
    taps = {n: GradientTap(targets[n]) for n in names}
    replace(model, taps)
    for n, tap in taps.items():
        tap.accumulator = torch.zeros(tap.base.out_features, tap.base.in_features, device="cuda")
    args, kwargs = gradients.block_inputs(model, blocks[0], batch)
    hidden = args[0] if args else kwargs["hidden_states"]
    result = {"layer_costs_activation_gib": sum(layer_costs({n: (t.base.out_features, t.base.in_features)},
                                                            hidden.shape[0] * hidden.shape[1], 2)[n]
                                                - 4 * t.base.out_features * t.base.in_features
                                                for n, t in taps.items()) / GIB}
    for label in ("eager", "compiled", "compiled_again"):
        if label == "compiled":
            compile_blocks(blocks[:1])
        gradients.run_blocks(blocks[:1], hidden, [(args, kwargs)]).sum().backward()  # warm-up (and compile)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = gradients.run_blocks(blocks[:1], hidden, [(args, kwargs)])
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
    """The estimate (compiled unless --eager), timed per group and per SVD; stacks: with the functions the main
    thread spent most wall time in (a sampling profiler)."""
    svd_seconds, group_marks = [0.0], []
    top_singular = gradients.top_singular

    def timed_svd(gradients_by_name, k, method):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = top_singular(gradients_by_name, k, method)
        torch.cuda.synchronize()
        svd_seconds[0] += time.perf_counter() - start
        return result

    batch_marks = []  # when each batch's backward returned (the CPU's view, no sync): per-width costs show here

    def progress(phase, done, total, metrics):
        if done == 0:  # the walk begins
            return
        batch_marks.append(time.perf_counter())
        if done == 1:
            for hook in hooks:
                hook.remove()
        if done % len(batches) == 0:
            torch.cuda.synchronize()
            group_marks.append((time.perf_counter(), torch.cuda.max_memory_allocated() / GIB))
            torch.cuda.reset_peak_memory_stats()

    gradients.top_singular = timed_svd
    blocks, _ = block_layout(model, list(targets))
    trace = []  # memory allocated after each block's forward, and each block's backward, in the first batch
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: trace.append((f"fwd{i}", torch.cuda.memory_allocated() / GIB)))
             for i, b in enumerate(blocks)]
    hooks += [b.register_full_backward_pre_hook(lambda m, g, i=i: trace.append((f"bwd{i}", torch.cuda.memory_allocated() / GIB)))
              for i, b in enumerate(blocks)]
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with StackSampler() if stacks else contextlib.nullcontext() as sampler:
        _, stats = gradients.estimate_gradient_svd(model, targets, batches, 16, budget, "lowrank", progress,
                                                   host_budget, compile=compile)
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    gradients.top_singular = top_singular
    times = [t - s for (t, _), s in zip(group_marks, [start] + [t for t, _ in group_marks[:-1]])]
    compile_report = {"compile_times": torch._dynamo.utils.compile_times(repr="str", aggregate=True),
                      "counters": {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v}}
    torch._dynamo.utils.counters.clear()
    return {"seconds": total, **compile_report, "svd_seconds": svd_seconds[0], "groups": len(stats.groups),
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
    parser.add_argument("--min-words", type=int, help="examples of min-words to max-words words instead of max-words")
    parser.add_argument("--max-words", type=int, default=900)
    parser.add_argument("--one-width", action="store_true", help="every estimation batch padded to the longest "
                        "one's width (compiled for that width, with cuDNN's attention), not each to its own")
    parser.add_argument("--eager", action="store_true", help="the estimate's blocks not compiled")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="SDPA may not pick cuDNN's attention "
                        "(which plans anew for each new sequence length)")
    parser.add_argument("--warm-pool", action="store_true", help="start the compile workers before the model loads, "
                        "as finetune does")
    parser.add_argument("--stacks", action="store_true", help="sample the main thread's stack: where each estimate's "
                        "wall time goes")
    parser.add_argument("--work", default="/tmp/bench7b")
    parser.add_argument("--name", default="profile_estimate")
    args = parser.parse_args()
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(work / "llama7b", 32)
    data = make_data(work / f"data{args.min_words or ''}_{args.max_words}.jsonl", max(args.samples, 64) + 16,
                     args.max_words, args.min_words)
    torch.cuda.set_per_process_memory_fraction(min(args.card_gib * GIB / torch.cuda.get_device_properties(0).total_memory, 1))
    config = Config(model=str(model_dir), data=str(data), data_format="text", rank=8, max_length=1024,
                    estimation_samples=args.samples, progress=False)
    start = time.perf_counter()
    if args.warm_pool:
        start_compile_workers()
    model, tokenizer, device = load_model(config)
    load_seconds = time.perf_counter() - start
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples, _ = load_examples(config.data, "text", tokenizer, 1024)
    targets = find_targets(model, config.target_list(), 8, "lora_ga")
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device)
    if args.one_width:
        width = max(b["input_ids"].shape[1] for b in batches)
        batches = [{"input_ids": F.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]), value=tokenizer.pad_token_id),
                    "labels": F.pad(b["labels"], (0, width - b["labels"].shape[1]), value=IGNORE)} for b in batches]
    results = {"device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "samples": args.samples,
               "min_words": args.min_words, "max_words": args.max_words, "one_width": args.one_width,
               "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled(),
               "tokens": sum(int((b["labels"] != -100).sum()) for b in batches),
               "padded_tokens": sum(b["input_ids"].numel() for b in batches), "compiled": not args.eager,
               "distinct_widths": len({b["input_ids"].shape[1] for b in batches}),
               "width_range": [min(b["input_ids"].shape[1] for b in batches), max(b["input_ids"].shape[1] for b in batches)],
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
        print(json.dumps({k: v for k, v in results["estimates"][-1].items() if k not in ("first_batch_trace", "stacks")}),
              flush=True)
    out = ROOT / "bench" / "results" / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
