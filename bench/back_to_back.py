"""Several LoRA-GA runs one after another in one process, as the app runs its jobs, on a GPU capped to a card's size,
with Python's cyclic garbage collector off: each run must find the memory the last one used free again.

Per run: seconds, the init's and training's peak (torch.cuda.max_memory_reserved, what a real card must hold), and
what is still allocated once finetune has returned. Writes bench/results/<name>.json after each run.
Usage: python bench/back_to_back.py --card-gib 8 --runs 3 --estimation-samples 128 --steps 16
"""
import argparse
import gc
import json
import time

import torch

from common import GIB, InitPeaks, add_output_args, cap_card, make_data, make_model_dir, peaks, save_result, work_dir
from frugal_loraga import Config, finetune


def run_once(config: Config) -> dict:
    """One finetune: its init's peaks taken when training begins (after the estimate), then the peak counters reset
    for training's. Reserved peaks include what the allocator still caches from the run before, as in the app."""
    init = InitPeaks()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = finetune(config, progress=init)
    return {"seconds": time.perf_counter() - start, "init_seconds": result.metrics["init_seconds"],
            "estimation_budget_gib": result.metrics["estimation_budget_gib"], **init.peaks, **peaks("train"),
            "allocated_after_return_gib": torch.cuda.memory_allocated() / GIB,
            "reserved_after_return_gib": torch.cuda.memory_reserved() / GIB,
            "final_train_loss": result.metrics["train_loss"][-1][1]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--card-gib", type=float, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--estimation-samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    add_output_args(parser, "back_to_back_7b_8gib", work="/tmp/bench7b")
    args = parser.parse_args()
    work = work_dir(args.work)
    model_dir = make_model_dir(work / f"llama2-7b-{args.layers}", args.layers)
    data = make_data(work / "data.jsonl", rows=max(args.estimation_samples, 2 * args.steps) + 16, words=900)
    cap_card(args.card_gib)
    result = {"device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "layers": args.layers,
              "estimation_samples": args.estimation_samples, "steps": args.steps, "max_length": args.max_length,
              "gc_enabled": False, "runs": []}
    gc.collect()
    gc.disable()  # the cyclic collector never runs: whatever a run leaves in a reference cycle stays
    for i in range(args.runs):
        config = Config(model=str(model_dir), data=str(data), estimation_samples=args.estimation_samples,
                        max_length=args.max_length, steps=args.steps, eval_fraction=0, save_every=0, seed=i,
                        out=str(work / f"run{i}"), overwrite=True, progress=False)
        result["runs"].append(run_once(config))
        print(json.dumps(result["runs"][-1]), flush=True)
        save_result(args.name, result)


if __name__ == "__main__":
    main()
