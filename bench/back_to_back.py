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
from pathlib import Path

import torch

from bench_7b import ROOT, make_data, make_model_dir
from frugal_loraga import Config, finetune
from frugal_loraga.progress import Phase

GIB = 2**30


def run_once(config: Config) -> dict:
    """One finetune: its init's peaks taken when training begins (after the estimate), then the peak counters reset
    for training's. Reserved peaks include what the allocator still caches from the run before, as in the app."""
    peaks, phases = {}, []

    def progress(phase, done, total, metrics):
        phases.append(phase)
        if phase in (Phase.COMPILING, Phase.TRAINING) and Phase.ESTIMATING in phases \
                and "init_peak_reserved_gib" not in peaks:
            peaks["init_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            peaks["init_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = finetune(config, progress=progress)
    return {"seconds": time.perf_counter() - start, "init_seconds": result.metrics["init_seconds"],
            "estimation_budget_gib": result.metrics["estimation_budget_gib"], **peaks,
            "train_peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "train_peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
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
    parser.add_argument("--work", default="/tmp/bench7b")
    parser.add_argument("--name", default="back_to_back_7b_8gib")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(work / f"llama2-7b-{args.layers}", args.layers)
    data = make_data(work / "data.jsonl", rows=max(args.estimation_samples, 2 * args.steps) + 16, words=900)
    torch.cuda.set_per_process_memory_fraction(args.card_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    result = {"device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "layers": args.layers,
              "estimation_samples": args.estimation_samples, "steps": args.steps, "max_length": args.max_length,
              "gc_enabled": False, "runs": []}
    out = ROOT / "bench" / "results" / f"{args.name}.json"
    gc.collect()
    gc.disable()  # the cyclic collector never runs: whatever a run leaves in a reference cycle stays
    for i in range(args.runs):
        config = Config(model=str(model_dir), data=str(data), estimation_samples=args.estimation_samples,
                        max_length=args.max_length, steps=args.steps, eval_fraction=0, save_every=0, seed=i,
                        out=str(work / f"run{i}"), overwrite=True, progress=False)
        result["runs"].append(run_once(config))
        print(json.dumps(result["runs"][-1]), flush=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
