"""Does LoRA-GA fit the card? finetune() with its defaults (no hand tuning) on a model shape with random weights,
loaded through the user's NF4 path, on a GPU capped to the card's size: the init's and training's peaks
(torch.cuda.max_memory_reserved, what a real card must hold), the init's seconds and training's tokens/s.

With --time-correction, the 4-bit error's correction is timed piece by piece (each call of nf4_error's first pass,
carried forwards, X^T X sums, Cholesky factors, per-layer corrections and SVDs, between torch.cuda.synchronize calls,
which add a little time of their own; the pieces nest: _correction holds best_correction, which holds top_singular;
a piece that a commit lacks is left out): torch's profiler over the whole correction did not finish in 5 minutes at 8B.
Per phase: the weights (allocated once the model is loaded), the init's peak (taken when training begins), training's
peak (counters reset after the init). Training tokens/s is timed from the end of step 2 (compile and the first steps
done) to the last step; train_step_seconds: each step's after the first, from one progress report to the next (a
stall shows apart from a steady rate). allocator_retries: how often over the run the CUDA allocator, at the card's
cap, freed its cache to retry an allocation (each synchronizes). Writes bench/results/<name>.json.
Usage: python bench/fit_card.py --shape llama3_8b --card-gib 8 --name llama3_8b_8gib
"""
import argparse
import collections
import functools
import json
import time

import torch

from common import (GIB, SHAPES, InitPeaks, add_output_args, cap_card, make_data, make_model_dir, peaks, save_result,
                    work_dir)
from frugal_loraga import Config, finetune, nf4_error
from frugal_loraga.progress import Phase

CORRECTION_PIECES = ("_block_inputs", "_carried", "_weightings", "whitening", "_correction", "best_correction",
                     "top_singular")


def print_profile(profiler) -> None:
    """The top 25 by GPU time and by CPU time (each op's own, not its children's)."""
    table = profiler.key_averages()
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        print(table.table(sort_by=key, row_limit=25, max_name_column_width=80), flush=True)


def time_correction_pieces() -> dict[str, list]:
    """nf4_error's CORRECTION_PIECES wrapped, each call timed between torch.cuda.synchronize calls: the returned
    dict fills as they run, name -> [seconds, calls]."""
    spent: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])

    def timed(name, inner):
        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                spent[name][0] += time.perf_counter() - start
                spent[name][1] += 1
        return wrapper
    for name in CORRECTION_PIECES:
        if hasattr(nf4_error, name):
            setattr(nf4_error, name, timed(name, getattr(nf4_error, name)))
    return spent


def run(config: Config, profile: bool = False) -> dict:
    """profile: the timed training steps under torch's profiler."""
    marks: dict = {}
    init = InitPeaks()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA]) if profile else None

    def progress(phase, done, total, metrics):
        init(phase, done, total, metrics)
        if phase == Phase.LOADING_MODEL:
            marks["loaded_from"] = torch.cuda.memory_allocated()
        if phase in (Phase.COMPILING, Phase.ESTIMATING) and "weights_gib" not in marks:
            marks["weights_gib"] = (torch.cuda.memory_allocated() - marks["loaded_from"]) / GIB
        if phase == Phase.TRAINING and done:
            marks.setdefault("step_ends", []).append(time.perf_counter())
        if phase == Phase.TRAINING and done == 2:
            torch.cuda.synchronize()
            marks["timed_from"] = (time.perf_counter(), metrics["train_tokens"])
            if profile:
                profiler.start()
        if phase == Phase.TRAINING and done == total and "timed_from" in marks:
            torch.cuda.synchronize()
            start, tokens = marks["timed_from"]
            marks["train_tokens_per_second"] = (metrics["train_tokens"] - tokens) / (time.perf_counter() - start)
            if profile:
                profiler.stop()
                print_profile(profiler)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        result = finetune(config, progress=progress)
    except Exception as e:  # does not fit: say where, with the peaks so far
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start, **marks, **init.peaks,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    marks.pop("timed_from", None), marks.pop("loaded_from", None)
    ends = marks.pop("step_ends", [])
    marks["train_step_seconds"] = [round(b - a, 4) for a, b in zip(ends, ends[1:])]
    return {"seconds": time.perf_counter() - start, "init_seconds": result.metrics["init_seconds"],
            "estimation_budget_gib": result.metrics.get("estimation_budget_gib"),
            "estimation_groups": result.metrics.get("estimation_groups"),
            "correction_seconds": result.metrics.get("correction_seconds"),
            "corrected_layers": result.metrics.get("corrected_layers"),
            "recomputed_layers": result.metrics.get("recomputed_layers"),
            "layers_keeping_weights": result.metrics.get("layers_keeping_weights"), **marks, **init.peaks,
            **peaks("train"), "allocator_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
            "final_train_loss": result.metrics["train_loss"][-1][1]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    parser.add_argument("--card-gib", type=float, default=8)
    parser.add_argument("--layers", type=int, default=None, help="default: the model's own")
    parser.add_argument("--estimation-samples", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--embeddings-on-gpu", action="store_true", help="Config.embeddings_on_cpu off")
    parser.add_argument("--nf4-error-rank", type=int, default=Config.nf4_error_rank, help="0: no correction")
    parser.add_argument("--init", choices=["lora_ga", "lora"], default=Config.init, help="lora: no estimate (to time "
                        "training alone)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="every layer keeps its activations")
    parser.add_argument("--keep-activations-gib", type=float, default=None,
                        help="Config.keep_activations_gib (default: what the card has free; 0: recompute every layer)")
    parser.add_argument("--experts-16bit", action="store_true", help="Config.quantize_experts off: MoE expert stacks "
                        "in 16 bits, as transformers loads them")
    parser.add_argument("--grad-budget-gib", type=float, help="Config.grad_budget_gib (default: about half the card)")
    parser.add_argument("--profile", choices=["training"], help="print what took longest in the timed training steps")
    parser.add_argument("--time-correction", action="store_true", help="time the 4-bit error's correction piece by "
                        "piece (correction_pieces: name -> [seconds, calls])")
    add_output_args(parser, None, work="/tmp/fit_card")
    args = parser.parse_args()
    layers = args.layers or {"qwen25_14b": 48}.get(args.shape, 32)
    work = work_dir(args.work)
    model_dir = make_model_dir(work / f"{args.shape}-{layers}", layers, args.shape)
    data = make_data(work / "data.jsonl", rows=max(args.estimation_samples, 2 * args.steps) + 16, words=900)
    cap_card(args.card_gib)
    config = Config(model=str(model_dir), data=str(data), estimation_samples=args.estimation_samples,
                    max_length=args.max_length, batch_size=args.batch_size, steps=args.steps, eval_fraction=0,
                    save_every=0, out=str(work / f"run-{args.name}"), overwrite=True, progress=False,
                    embeddings_on_cpu=not args.embeddings_on_gpu, nf4_error_rank=args.nf4_error_rank, init=args.init,
                    gradient_checkpointing=not args.no_gradient_checkpointing,
                    keep_activations_gib=args.keep_activations_gib, grad_budget_gib=args.grad_budget_gib,
                    quantize_experts=not args.experts_16bit)
    pieces = time_correction_pieces() if args.time_correction else {}
    kind, sizes = SHAPES[args.shape]
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape, "layers": layers, "card_gib": args.card_gib,
              "model_config": {"class": kind, "num_hidden_layers": layers, **sizes},
              "estimation_samples": args.estimation_samples, "train_batch": f"{args.batch_size} x {args.max_length}",
              "embeddings_on_cpu": not args.embeddings_on_gpu, "nf4_error_rank": args.nf4_error_rank,
              "init": args.init, "gradient_checkpointing": not args.no_gradient_checkpointing,
              "keep_activations_gib": args.keep_activations_gib, "quantize_experts": not args.experts_16bit,
              **run(config, args.profile == "training")}
    if args.time_correction:
        result["correction_pieces"] = {name: [round(seconds, 3), calls] for name, (seconds, calls) in pieces.items()}
    print(json.dumps(result), flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
