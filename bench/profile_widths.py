"""What a batch width (sequence length) met for the first time costs our training step, against the same width met
again, on a Llama-2-7B-shaped NF4 model cut to a few decoder layers (run on the GPU).

After a first step (which compiles), the steps run batches of 2 x width random tokens, each width new to the
process, then the same widths again: per-step ms of both passes. Real data meets a new width at most steps early on,
since batches are cut to their longest example.
  --eager              the decoder layers not compiled
  --no-cudnn-attention SDPA may not pick cuDNN's attention
  --round-to N         widths rounded up to a multiple of N (as padding batches to it would)
  --warmup-width W     the first step's width (default: the largest), to see a graph traced again for a later width
  --profile            the top CPU ops (CUDA runtime calls included) and Python calls of a step at a new width and
                       of one at a width met before
Usage: python bench/profile_widths.py --layers 8 --steps 24 [--eager] [--no-cudnn-attention] [--round-to 64]
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

from common import add_output_args, make_data, make_model_dir, our_lora, save_result, top_events, work_dir
from frugal_loraga.blocks import block_layout, compile_blocks
from frugal_loraga.data import padded_width


def top_cpu_ops(step, width: int) -> list:
    """The ops and CUDA runtime calls that took most CPU time in step(width): [name, ms, calls]."""
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(width)
        torch.cuda.synchronize()
    return top_events(prof.key_averages(), "self_cpu_time_total", 25)


def top_python_calls(step, width: int) -> list:
    """The Python functions that took most time (their own, callees included) in step(width): [where, ms, calls]."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.runcall(step, width)
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: item[1][3], reverse=True)[:40]
    return [[f"{Path(f).name}:{line} {name}"[:100], round(1000 * cumulative, 2), calls]
            for (f, line, name), (_, calls, _, cumulative, _) in rows]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24, help="steps per pass, each at a width of its own")
    parser.add_argument("--min-width", type=int, default=90)
    parser.add_argument("--max-width", type=int, default=1000)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-cudnn-attention", action="store_true")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--warmup-width", type=int, help="the width of the first step, which compiles (default: the "
                        "largest); the passes show any graph traced again for a later width")
    parser.add_argument("--profile", action="store_true")
    add_output_args(parser, "profile_widths", work="/tmp/profile_train")
    args = parser.parse_args()
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    work = work_dir(args.work)
    model_dir = make_model_dir(work / f"llama7b_{args.layers}layers", args.layers)
    model, optimizer, context = our_lora(model_dir, make_data(work / "data.jsonl", 8, words=900), 1024)
    if not args.eager:
        compile_blocks(block_layout(model, [n for n, _ in model.named_modules() if n.endswith("q_proj")])[0],
                       any_width=True)
    rng = random.Random(0)
    rounded = sorted({padded_width(w, args.round_to) for w in range(args.min_width, args.max_width + 1)})
    unused = [w for w in rounded if w not in (args.warmup_width, rounded[-1])]
    widths = rng.sample(unused, min(args.steps + 3, len(unused)))
    new, profiled = widths[:-3], widths[-3:]  # the last are kept for the profiles of new widths

    def step(width):
        ids = torch.randint(3, 32000, (2, width), device="cuda")
        with context():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(args.warmup_width or rounded[-1])  # the compile, at a width the passes do not use
    torch.cuda.synchronize()
    torch._dynamo.utils.counters.clear()
    passes = {}
    for label in ("new_widths", "seen_widths"):
        milliseconds = []
        for width in new:
            start = time.perf_counter()
            step(width)
            torch.cuda.synchronize()
            milliseconds.append(round(1000 * (time.perf_counter() - start), 2))
        passes[label] = {"ms_per_step": sum(milliseconds) / len(milliseconds), "ms": milliseconds,
                         "compile_counters": {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v}}
        torch._dynamo.utils.counters.clear()
    results = {"device": torch.cuda.get_device_name(), "layers": args.layers, "compiled": not args.eager,
               "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled(), "round_to": args.round_to,
               "warmup_width": args.warmup_width or rounded[-1],
               "widths": new, **passes,
               "new_width_extra_ms": passes["new_widths"]["ms_per_step"] - passes["seen_widths"]["ms_per_step"]}
    if args.profile:
        step(profiled[0])  # the profilers' own first-call costs
        results["top_cpu_ms_new_width"] = top_cpu_ops(step, profiled[1])
        results["top_cpu_ms_seen_width"] = top_cpu_ops(step, new[0])
        results["top_python_ms_new_width"] = top_python_calls(step, profiled[2])
        results["top_python_ms_seen_width"] = top_python_calls(step, new[1])
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (list, dict))}), flush=True)
    save_result(args.name, results)


if __name__ == "__main__":
    main()
