"""LoRA-GA init and training on a Llama-2-7B-shaped model with random weights, through the user's NF4 path, on a
GPU whose memory is capped to emulate a consumer card. Writes bench/results/<name>.json after each phase.

Baselines measured in the same run:
- plain LoRA training (ours) over as many micro-batches as the estimation has (one checkpointed forward/backward per
  batch), run twice so that the second, timed one has its layers and Triton kernels compiled: init_seconds / its
  train_seconds is the estimation's cost ratio, for the first LoRA-GA run (its compile included) and for a second
  one (lora_ga_warm: one training step, its estimate compiled from the caches the first one filled);
- the peer users run today: transformers + bitsandbytes NF4 + PEFT LoRA (all linear layers, rank 8), gradient
  checkpointing, paged AdamW 8-bit, at the same batch and length: tokens/s and peak memory.
Usage: python bench/bench_7b.py --card-gib 24 --estimation-samples 128
       python bench/bench_7b.py --card-gib 80 --estimation-samples 128 --only peft_loraga --name peft_loraga_7b
       python bench/bench_7b.py --card-gib 80 --estimation-samples 32 --only fidelity --name fidelity_7b
"""
import argparse
import contextlib
import gc
import json
import time
from functools import partial
from pathlib import Path

import torch

from common import (GIB, add_output_args, add_words_args, cap_card, make_model_dir, peer_batches, peer_model,
                    save_result, time_steps, words_data, work_dir)
from stacks import StackSampler
from frugal_loraga import Config, finetune
from frugal_loraga.init import estimation_batches
from frugal_loraga.data import load_examples
from frugal_loraga.fidelity import captured_energy, exact_gradients
from frugal_loraga.estimate import estimate_gradient_svd
from frugal_loraga.memory import layer_costs
from frugal_loraga.progress import Phase
from frugal_loraga.lora import find_targets
from frugal_loraga.models import load_model


def qlora_step(model, optimizer, batch: dict) -> None:
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peer_qlora(model_dir: Path, data: Path, steps: int, max_length: int) -> dict:
    """The QLoRA peer (peer_model), checkpointed: 2 warm-up steps, then `steps` timed steps of 2 x max_length."""
    model, optimizer = peer_model(model_dir)
    batches = peer_batches(model_dir, data, 2 * (steps + 2), max_length, "cuda")
    result = {"steps": steps, **time_steps(partial(qlora_step, model, optimizer), batches)}
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def peer_peft_loraga(model_dir: Path, data: Path, samples: int, max_length: int, device: str = "cuda") -> dict:
    """PEFT's own LoRA-GA on the bf16 model (it refuses 4-bit ones): preprocess_loraga over `samples` examples in
    batches of 2 (tokenized beforehand, as ours are), then get_peft_model (the SVD init). Wall time and peak memory
    of the two together."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    batches = peer_batches(model_dir, data, samples, max_length, device)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights="lora_ga",  # its preprocess needs names, not all-linear
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        lora_ga_config=LoraGAConfig(), task_type="CAUSAL_LM")

    def train_step():
        for batch in batches:
            model(**batch, labels=batch["input_ids"]).loss.backward()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    preprocess_loraga(model, config, train_step)
    get_peft_model(model, config)
    if device == "cuda":
        torch.cuda.synchronize()
    result = {"init_seconds": time.perf_counter() - start, "samples": sum(len(b["input_ids"]) for b in batches),
              "model_dtype": "bfloat16 (PEFT's LoRA-GA refuses 4-bit models)",
              "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None}
    return result


def fidelity_top_block(model_dir: Path, data: Path, samples: int, max_length: int) -> dict:
    """Captured top-16 gradient energy of our estimate (randomized SVD, one group) against the exact
    autograd gradient, for the top decoder layer's 7 layers on the bf16 model: the cost of sketching at 7B shapes."""
    config = Config(model=str(model_dir), data=str(data), data_format="text", rank=8, max_length=max_length,
                    load_in_4bit=False, estimation_samples=samples, estimation_batch_size=2, progress=False)
    model, tokenizer, device = load_model(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples, _ = load_examples(config.data, "text", tokenizer, max_length)
    targets = find_targets(model, config.target_list(), 8, "lora_ga")
    top = f"model.layers.{model.config.num_hidden_layers - 1}."
    targets = {n: m for n, m in targets.items() if n.startswith(top)}
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device)
    grads = exact_gradients(model, targets, batches)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    budget = sum(layer_costs(shapes, max(b["input_ids"].numel() for b in batches), 2).values())
    svds, stats = estimate_gradient_svd(model, targets, batches, 16, budget, "lowrank")
    energy = {n.removeprefix(top): captured_energy(grads[n], svds[n].U, svds[n].V) for n in targets}
    del model, grads
    gc.collect()
    return {"layers": energy, "groups": len(stats.groups), "min": min(energy.values())}


def compile_seconds() -> float:
    """Seconds spent in torch.compile so far in this process: dynamo, AOTAutograd and inductor, and the backward
    graphs compiled at their first backward."""
    names, seconds = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    times = dict(zip(names, seconds))
    return sum(float(times.get(name, 0.0)) for name in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"))


def step_seconds(marks: list[tuple[str, float]]) -> list[float]:
    """Each training step's seconds from finetune's progress reports (phase, time): the compiling and training
    reports after the last one of loading or estimating are training's, its start and then one per step (the first
    step's compile included)."""
    last = max(i for i, (phase, _) in enumerate(marks) if phase in (Phase.LOADING_DATA, Phase.LOADING_MODEL,
                                                                      Phase.ESTIMATING))
    times = [t for phase, t in marks[last + 1:] if phase in (Phase.COMPILING, Phase.TRAINING)]
    return [round(b - a, 4) for a, b in zip(times, times[1:])]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--card-gib", type=float, default=24)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--estimation-samples", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=32, help="LoRA-GA training steps (the compile included)")
    parser.add_argument("--grad-budget-gib", type=float, help="LoRA-GA gradient state budget (default: half of free)")
    parser.add_argument("--max-length", type=int, default=1024)
    add_words_args(parser)
    parser.add_argument("--peer-steps", type=int, default=12, help="timed steps of the PEFT QLoRA peer (0: skip)")
    parser.add_argument("--only", choices=["peft_loraga", "fidelity"], help="run just this measurement: PEFT's "
                        "LoRA-GA init (bf16, ~27 GiB), or our estimate's captured energy on the top layer's weights")
    parser.add_argument("--stacks", action="store_true", help="sample the main thread's stack in each of our runs: "
                        "where its wall time goes (bench/stacks.py)")
    add_output_args(parser, "bench_7b_24gib", work="/tmp/bench7b")
    args = parser.parse_args()
    work = work_dir(args.work)
    model_dir = make_model_dir(work / "llama7b", args.layers)
    data = words_data(work, max(args.estimation_samples, 2 * args.peer_steps + 4, 64) + 16, args)
    cap_card(args.card_gib)
    results = {"device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "layers": args.layers,
               "shape": "Llama-2-7B (h 4096, i 11008, 32 heads, vocab 32000), random weights, NF4 double quant",
               "max_length": args.max_length, "min_words": args.min_words, "max_words": args.max_words, "rank": 8,
               "estimation_samples": args.estimation_samples, "estimation_batch_size": 2,
               "train_batch": f"2 x {'up to ' if args.min_words else ''}{args.max_length}"}
    shared = dict(model=str(model_dir), data=str(data), data_format="text", rank=8, max_length=args.max_length,
                  batch_size=2, estimation_samples=args.estimation_samples, estimation_batch_size=2, eval_fraction=0.0,
                  eval_every=0, save_every=0, progress=False, overwrite=True)  # the runs below reuse their folders
    if args.only == "peft_loraga":  # needs about 27 GiB: run it with --card-gib above that
        results["peer_peft_loraga"] = peer_peft_loraga(model_dir, data, args.estimation_samples, args.max_length)
    if args.only == "fidelity":
        results["fidelity_top_block"] = fidelity_top_block(model_dir, data, args.estimation_samples, args.max_length)
    if args.only:
        save_result(args.name, results)
        print(json.dumps(results, indent=1))
        return
    if args.peer_steps:  # first, in a fresh process, so that nothing of ours is left on the card
        results["peer_peft_qlora"] = peer_qlora(model_dir, data, args.peer_steps, args.max_length)
        save_result(args.name, results)
        print("peer_peft_qlora", json.dumps(results["peer_peft_qlora"]), flush=True)
    baseline = Config(init="lora", steps=args.estimation_samples // 2, out=str(work / "run_lora"), **shared)
    for label, config in [
        ("lora_ga", Config(init="lora_ga", steps=args.train_steps, grad_budget_gib=args.grad_budget_gib,
                           out=str(work / "run_ga"), **shared)),
        ("lora_ga_warm", Config(init="lora_ga", steps=1, grad_budget_gib=args.grad_budget_gib,
                                out=str(work / "run_ga_warm"), **shared)),
        ("baseline_lora_fwd_bwd_warmup", baseline),
        ("baseline_lora_fwd_bwd", baseline),
    ]:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        compiling = compile_seconds()
        torch._dynamo.utils.counters.clear()
        start = time.perf_counter()
        marks = []  # (phase, time) of each progress report: the training steps' own seconds
        with StackSampler() if args.stacks else contextlib.nullcontext() as sampler:
            metrics = finetune(config, progress=lambda phase, *_: marks.append((phase, time.perf_counter()))).metrics
        results[label] = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        results[label]["step_seconds"] = step_seconds(marks)
        results[label]["ms_per_step_after_the_first"] = 1000 * sum(results[label]["step_seconds"][1:]) / max(
            len(results[label]["step_seconds"]) - 1, 1)
        results[label]["wall_seconds"] = time.perf_counter() - start
        results[label]["compile_seconds"] = compile_seconds() - compiling
        results[label]["compile_counters"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()
                                              if k in ("stats", "aot_autograd", "inductor", "recompiles")}
        if args.stacks:
            results[label]["stacks"] = sampler.report()
        save_result(args.name, results)
        print(label, json.dumps({k: v for k, v in results[label].items() if k != "stacks"}), flush=True)
    ga, base = results["lora_ga"], results["baseline_lora_fwd_bwd"]
    results["estimation_over_fwd_bwd"] = ga["init_seconds"] / base["train_seconds"]
    results["warm_estimation_over_fwd_bwd"] = results["lora_ga_warm"]["init_seconds"] / base["train_seconds"]
    if args.peer_steps:
        peer = results["peer_peft_qlora"]
        results["ours_lora_over_peer_tokens_per_second"] = base["tokens_per_second"] / peer["tokens_per_second"]
        results["ours_lora_ga_over_peer_tokens_per_second"] = ga["tokens_per_second"] / peer["tokens_per_second"]
        results["ours_lora_ga_init_peak_over_peer_peak"] = ga["peak_memory_init_gib"] / peer["peak_memory_gib"]
    save_result(args.name, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
