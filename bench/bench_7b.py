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
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import make_tokenizer  # noqa: E402
from stacks import StackSampler  # noqa: E402
from frugal_loraga import Config, finetune  # noqa: E402
import frugal_loraga.train as train_module  # noqa: E402
from frugal_loraga.api import estimation_batches  # noqa: E402
from frugal_loraga.blocks import compile_blocks  # noqa: E402
from frugal_loraga.data import load_examples  # noqa: E402
from frugal_loraga.fidelity import captured_energy, exact_gradients  # noqa: E402
from frugal_loraga.gradients import estimate_gradient_svd  # noqa: E402
from frugal_loraga.memory import layer_costs  # noqa: E402
from frugal_loraga.progress import Phase  # noqa: E402
from frugal_loraga.lora import find_targets  # noqa: E402
from frugal_loraga.models import load_model  # noqa: E402


SHAPES = {  # the model shapes the benchmarks build: (config class, its sizes)
    "llama2_7b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=32000)),
    "llama3_8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)),
    "qwen25_14b": ("Qwen2Config", dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                       num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)),
}


def make_model_dir(path: Path, layers: int, shape: str = "llama2_7b") -> Path:
    """A model folder of the shape, `layers` decoder layers, random bf16 weights as safetensors (built on the GPU)."""
    import transformers
    from transformers import AutoModelForCausalLM
    if (path / "config.json").exists():
        return path
    tokenizer = make_tokenizer()
    kind, sizes = SHAPES[shape]
    config = getattr(transformers, kind)(num_hidden_layers=layers, max_position_embeddings=4096,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **sizes)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def make_data(path: Path, rows: int, words: int, min_words: Optional[int] = None) -> Path:
    """Rows of random words from the sample data: `words` each, or between min_words and words."""
    vocabulary = (ROOT / "data" / "sample.jsonl").read_text().split()
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(
        vocabulary, k=words if min_words is None else rng.randint(min_words, words)))}) + "\n" for _ in range(rows)))
    return path


def peer_batches(model_dir: Path, data: Path, count: int, max_length: int, device) -> list[dict]:
    """The first `count` texts of the data file, tokenized for the peers in batches of 2 x up to max_length."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()][:count]
    return [tokenizer(texts[i:i + 2], return_tensors="pt", truncation=True, max_length=max_length,
                      padding=True).to(device) for i in range(0, len(texts), 2)]


def peer_model(model_dir: Path, checkpointing: bool = True):
    """(model, optimizer) as users set up QLoRA today: transformers + bitsandbytes NF4 (double quant) +
    prepare_model_for_kbit_training + PEFT LoRA on all linear layers, rank 8, paged AdamW 8-bit."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()  # as a Trainer does: gradient checkpointing only acts in training mode
    return model, bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def time_steps(step, batches: list[dict]) -> dict:
    """step(batch) on the first 2 batches to warm up, then timed over the rest: ms/step, tokens/s, peak GiB."""
    for batch in batches[:2]:
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[2:])
    return {"ms_per_step": 1000 * seconds / len(batches[2:]), "tokens_per_second": tokens / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


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
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
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
    parser.add_argument("--min-words", type=int, help="examples of min-words to max-words words (of varying lengths, "
                        "as real data has) instead of max-words")
    parser.add_argument("--max-words", type=int, default=900)
    parser.add_argument("--first-width-graphs", action="store_true", help="training compiles its graphs for the "
                        "first batch width met, then again for any (as before any_width), instead of for any at once")
    parser.add_argument("--cudnn-attention", action="store_true", help="training may use cuDNN's attention on "
                        "batches of several widths too (as before attention_for; the estimate still leaves it out)")
    parser.add_argument("--peer-steps", type=int, default=12, help="timed steps of the PEFT QLoRA peer (0: skip)")
    parser.add_argument("--only", choices=["peft_loraga", "fidelity"], help="run just this measurement: PEFT's "
                        "LoRA-GA init (bf16, ~27 GiB), or our estimate's captured energy on the top layer's weights")
    parser.add_argument("--stacks", action="store_true", help="sample the main thread's stack in each of our runs: "
                        "where its wall time goes (bench/stacks.py)")
    parser.add_argument("--work", default="/tmp/bench7b")
    parser.add_argument("--name", default="bench_7b_24gib")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    total = torch.cuda.get_device_properties(0).total_memory
    model_dir = make_model_dir(work / "llama7b", args.layers)
    data = make_data(work / f"data{args.min_words or ''}_{args.max_words}.jsonl",
                     max(args.estimation_samples, 2 * args.peer_steps + 4, 64) + 16, args.max_words, args.min_words)
    torch.cuda.set_per_process_memory_fraction(min(args.card_gib * 2**30 / total, 1.0))
    if args.first_width_graphs:
        train_module.compile_blocks = lambda blocks, any_width: compile_blocks(blocks)
    if args.cudnn_attention:
        train_module.attention_for = lambda widths: contextlib.nullcontext()
    results = {"device": torch.cuda.get_device_name(), "card_gib": args.card_gib, "layers": args.layers,
               "shape": "Llama-2-7B (h 4096, i 11008, 32 heads, vocab 32000), random weights, NF4 double quant",
               "max_length": args.max_length, "min_words": args.min_words, "max_words": args.max_words,
               "first_width_graphs": args.first_width_graphs, "cudnn_attention_on_several_widths": args.cudnn_attention,
               "rank": 8,
               "estimation_samples": args.estimation_samples, "estimation_batch_size": 2,
               "train_batch": f"2 x {'up to ' if args.min_words else ''}{args.max_length}"}
    out = ROOT / "bench" / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    common = dict(model=str(model_dir), data=str(data), data_format="text", rank=8, max_length=args.max_length,
                  batch_size=2, estimation_samples=args.estimation_samples, estimation_batch_size=2, eval_fraction=0.0,
                  eval_every=0, save_every=0, progress=False)
    if args.only == "peft_loraga":  # needs about 27 GiB: run it with --card-gib above that
        results["peer_peft_loraga"] = peer_peft_loraga(model_dir, data, args.estimation_samples, args.max_length)
    if args.only == "fidelity":
        results["fidelity_top_block"] = fidelity_top_block(model_dir, data, args.estimation_samples, args.max_length)
    if args.only:
        out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
        return
    if args.peer_steps:  # first, in a fresh process, so that nothing of ours is left on the card
        results["peer_peft_qlora"] = peer_qlora(model_dir, data, args.peer_steps, args.max_length)
        out.write_text(json.dumps(results, indent=1))
        print("peer_peft_qlora", json.dumps(results["peer_peft_qlora"]), flush=True)
    baseline = Config(init="lora", steps=args.estimation_samples // 2, out=str(work / "run_lora"), **common)
    for label, config in [
        ("lora_ga", Config(init="lora_ga", steps=args.train_steps, grad_budget_gib=args.grad_budget_gib,
                           out=str(work / "run_ga"), **common)),
        ("lora_ga_warm", Config(init="lora_ga", steps=1, grad_budget_gib=args.grad_budget_gib,
                                out=str(work / "run_ga_warm"), **common)),
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
        out.write_text(json.dumps(results, indent=1))
        print(label, json.dumps({k: v for k, v in results[label].items() if k != "stacks"}), flush=True)
    ga, base = results["lora_ga"], results["baseline_lora_fwd_bwd"]
    results["estimation_over_fwd_bwd"] = ga["init_seconds"] / base["train_seconds"]
    results["warm_estimation_over_fwd_bwd"] = results["lora_ga_warm"]["init_seconds"] / base["train_seconds"]
    if args.peer_steps:
        peer = results["peer_peft_qlora"]
        results["ours_lora_over_peer_tokens_per_second"] = base["tokens_per_second"] / peer["tokens_per_second"]
        results["ours_lora_ga_over_peer_tokens_per_second"] = ga["tokens_per_second"] / peer["tokens_per_second"]
        results["ours_lora_ga_init_peak_over_peer_peak"] = ga["peak_memory_init_gib"] / peer["peak_memory_gib"]
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
