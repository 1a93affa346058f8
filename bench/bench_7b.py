"""LoRA-GA init and training on a Llama-2-7B-shaped model with random weights, through the user's NF4 path, on a
GPU whose memory is capped to emulate a consumer card. Writes bench/results/<name>.json after each phase.

Baseline measured in the same run: plain LoRA training over the same number of micro-batches as the estimation
(one checkpointed forward/backward per batch), so init_seconds / baseline_seconds is the estimation's cost ratio.
Usage: python bench/bench_7b.py --card-gib 24 --estimation-samples 32
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import make_tokenizer  # noqa: E402
from frugal_loraga import Config, finetune  # noqa: E402


def make_model_dir(path: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    if (path / "config.json").exists():
        return path
    tokenizer = make_tokenizer()
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def make_data(path: Path, rows: int, words: int) -> Path:
    vocabulary = (ROOT / "data" / "sample.jsonl").read_text().split()
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(vocabulary, k=words))}) + "\n"
                            for _ in range(rows)))
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--card-gib", type=float, default=24)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--estimation-samples", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/bench7b")
    parser.add_argument("--name", default="bench_7b_24gib")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    total = torch.cuda.get_device_properties(0).total_memory
    model_dir = make_model_dir(work / "llama7b", args.layers)
    data = make_data(work / "data.jsonl", max(args.estimation_samples, 64) + 16, words=900)
    torch.cuda.set_per_process_memory_fraction(min(args.card_gib * 2**30 / total, 1.0))
    results = {"device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "layers": args.layers,
               "shape": "Llama-2-7B (h 4096, i 11008, 32 heads, vocab 32000), random weights, NF4 double quant",
               "max_length": args.max_length, "rank": 8, "estimation_samples": args.estimation_samples,
               "estimation_batch_size": 2, "train_batch": f"2 x {args.max_length}"}
    out = ROOT / "bench" / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    common = dict(model=str(model_dir), data=str(data), data_format="text", rank=8, max_length=args.max_length,
                  batch_size=2, estimation_samples=args.estimation_samples, estimation_batch_size=2, eval_fraction=0.0,
                  eval_every=0, save_every=0, progress=False)
    for label, config in [
        ("lora_ga", Config(init="lora_ga", steps=args.train_steps, out=str(work / "run_ga"), **common)),
        ("baseline_lora_fwd_bwd", Config(init="lora", steps=args.estimation_samples // 2, out=str(work / "run_lora"),
                                         **common)),
    ]:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        metrics = finetune(config).metrics
        results[label] = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        results[label]["wall_seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(results, indent=1))
        print(label, json.dumps(results[label]), flush=True)
    ga, base = results["lora_ga"], results["baseline_lora_fwd_bwd"]
    results["estimation_over_fwd_bwd"] = ga["init_seconds"] / base["train_seconds"]
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
