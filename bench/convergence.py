"""Does LoRA-GA converge faster than LoRA here? Loss curves, steps to QLoRA's final eval loss and task accuracy on a
real pretrained model, and what 4-bit, its error correction and randomized SVD do to gradient fidelity.

Methods (rank 8, alpha 16, rsLoRA, all linear layers; same seeds, data order and step budget):
  full                      every weight trained (fp32 weights)
  lora                      plain LoRA (Kaiming A, zero B) on the bf16 base
  qlora                     plain LoRA on the NF4 base, what users run today (the peer)
  qlora_corrected           plain LoRA on the NF4 base with its error corrected (nf4_error.py; CLoQ-like)
  lora_ga_exact             LoRA-GA on the bf16 base: the whole gradient at once, exact SVD
  lora_ga_ours              LoRA-GA on the NF4 base with its error corrected (the default), streamed in groups
  lora_ga_ours_uncorrected  the same without the correction (nf4_error_rank 0: before 2026-12-05)
  lora_ga_original          LoRA-GA on the NF4 base, corrected, its factors from the gradient of the original (bf16)
                            model: what estimating it from the weights streamed off the safetensors files would give
Each method's learning rate is picked on a small grid by its final eval loss (seed 0); the picked lr is then rerun with
more seeds to measure the noise. Tasks (--task): arithmetic word problems from data/make_sample.py (train and test
drawn with different seeds; accuracy: the greedy answer's "The answer is N"), or gsm: GSM8K-style problems with worked
answers (bench/data, made by bench/make_gsm.py; test templates held out of training; accuracy: the greedy answer's
"#### N").

Run on a GPU:                                python bench/convergence.py --task gsm --parallel 10
Plot and table from saved results:            python bench/convergence.py --task gsm --report   (needs matplotlib)
Every finished run is saved under --work as it ends and skipped when the script runs again: a stopped sweep continues,
also on another machine from the runs saved in --out's JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import torch

from common import RESULTS, ROOT
from data.make_sample import problem
from frugal_loraga.api import finetune
from frugal_loraga.checkpoint import adapter_for
from frugal_loraga.init import estimation_batches, initial_corrections, initial_factors
from frugal_loraga.config import Config
from frugal_loraga.data import load_examples, render
from frugal_loraga.fidelity import captured_energy, exact_gradients, subspace_agreement
from frugal_loraga.estimate import estimate_gradient_svd
from frugal_loraga.svd import top_singular
from frugal_loraga.lora import find_targets
from frugal_loraga.models import demo_model_dir, load_model
from frugal_loraga.train import train

RANK = 8
LORA_LRS = [3e-5, 1e-4, 3e-4, 1e-3]
LORA_GA_LRS = [3e-6, 1e-5, 3e-5, 1e-4, 3e-4]
UNCORRECTED = dict(nf4_error_rank=0)
METHODS = {  # name: (Config settings, lr grid)
    "full": (dict(init="lora", load_in_4bit=False, dtype="float32"), [3e-6, 1e-5, 3e-5, 1e-4]),
    "lora": (dict(init="lora", load_in_4bit=False), LORA_LRS),
    "qlora": (dict(init="lora", load_in_4bit=True, **UNCORRECTED), LORA_LRS),
    "qlora_corrected": (dict(init="lora", load_in_4bit=True), LORA_LRS),
    "lora_ga_exact": (dict(init="lora_ga", load_in_4bit=False, svd="exact", grad_budget_gib=64.0), LORA_GA_LRS),
    "lora_ga_ours": (dict(init="lora_ga", load_in_4bit=True, svd="lowrank"), LORA_GA_LRS),
    "lora_ga_ours_uncorrected": (dict(init="lora_ga", load_in_4bit=True, svd="lowrank", **UNCORRECTED), LORA_GA_LRS),
    "lora_ga_original": (dict(init="lora_ga", load_in_4bit=True, svd="lowrank"), LORA_GA_LRS),
}
COLORS = {"full": "black", "lora": "#1e40af", "qlora": "#60a5fa", "qlora_corrected": "#0d9488",
          "lora_ga_exact": "#9a3412", "lora_ga_ours": "#ea580c", "lora_ga_ours_uncorrected": "#fbbf24",
          "lora_ga_original": "#7c3aed"}
TASKS = {  # name: (max_length, new tokens for the accuracy, the answer's pattern in a completion, our budget in GiB:
    # a few groups on the demo model)
    "arithmetic": (128, 32, r"answer is (-?\d+)", 0.1),
    "gsm": (384, 256, r"####\s*(-?[\d,]*\.?\d+)", 0.3),
}


def write_data(task: str, paths: tuple[Path, Path], n_train: int, n_test: int) -> None:
    """arithmetic: train and test problems from different seeds, test questions that also occur in train dropped;
    gsm: bench/data's files (test templates held out)."""
    if task == "gsm":
        for path, name in zip(paths, ("gsm_train", "gsm_test")):
            path.write_text((ROOT / "bench" / "data" / f"{name}.jsonl").read_text())
        return
    rng = random.Random(1)
    train_rows = [problem(rng) for _ in range(n_train)]
    seen = {r["input"] for r in train_rows}
    rng, test_rows = random.Random(2), []
    while len(test_rows) < n_test:
        row = problem(rng)
        if row["input"] not in seen:
            test_rows.append(row)
    for path, rows in zip(paths, (train_rows, test_rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def final_answer(text: str, pattern: str) -> str | None:
    """The answer a text states (pattern's group), without thousands separators or a trailing .0; None if none."""
    found = re.search(pattern, text)
    if found is None:
        return None
    value = found.group(1).replace(",", "")
    return value[:-2] if value.endswith(".0") else value


@torch.no_grad()
def accuracy(model, tokenizer, test_path: Path, n: int, device, task: str) -> float:
    """Fraction of test problems whose greedy completion states the right answer."""
    _, new_tokens, pattern, _ = TASKS[task]
    rows = [json.loads(line) for line in test_path.read_text().splitlines()[:n]]
    prompts = []
    for row in rows:
        text, spans = render(row, "alpaca", tokenizer)
        prompts.append(text[:spans[0][0]])
    tokenizer.padding_side = "left"
    right = 0
    model.eval()
    for i in range(0, len(rows), 64):
        batch = tokenizer(prompts[i:i + 64], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row, ids in zip(rows[i:i + 64], out[:, batch["input_ids"].shape[1]:]):
            said = final_answer(tokenizer.decode(ids, skip_special_tokens=True), pattern)
            right += said is not None and said == final_answer(row["output"], pattern)
    tokenizer.padding_side = "right"
    return right / len(rows)


def full_finetune(config: Config):
    """Every weight trained by the same loop as the adapters (train.train with params = all weights)."""
    torch.manual_seed(config.seed)
    model, tokenizer, device = load_model(config)
    config = config.resolve(device.type)
    for p in model.parameters():
        p.requires_grad_(True)
    train_examples, _ = load_examples(config.data, config.data_format, tokenizer, config.max_length)
    eval_examples, _ = load_examples(config.eval_data, config.data_format, tokenizer, config.max_length)
    metrics = {"train_loss": [], "eval_loss": [], "train_tokens": 0, "train_seconds": 0.0}
    train(model, {}, train_examples, eval_examples, config, {}, tokenizer.pad_token_id, metrics)
    metrics["tokens_per_second"] = metrics["train_tokens"] / metrics["train_seconds"]
    return metrics, model, tokenizer, device


def original_factors(config: Config):
    """LoRA-GA's factors estimated on the original (bf16) model, for the NF4 base: finetune's initial_factors, its
    call on the NF4 model replaced by these (the corrections are still made on the NF4 base)."""
    original = replace(config, load_in_4bit=False)
    model, tokenizer, device = load_model(original)
    examples, _ = load_examples(original.data, original.data_format, tokenizer, original.max_length)
    targets = find_targets(model, original.target_list(), original.rank, original.init)
    factors, metrics = initial_factors(model, targets, examples, original.resolve(device.type), tokenizer.pad_token_id,
                                       device)
    return lambda *_, **__: (factors, metrics)


def run_name(method: str, lr: float, seed: int) -> str:
    """The stem of a run's cached result and log under --work."""
    return f"{method}_lr{lr:g}_seed{seed}"


def run(method: str, lr: float, seed: int, args, data: tuple[Path, Path]) -> dict:
    """One training run; its result is cached as JSON under --work."""
    cache = args.work / f"{run_name(method, lr, seed)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    settings, _ = METHODS[method]
    if method in ("lora_ga_ours", "lora_ga_original"):
        settings = dict(settings, grad_budget_gib=args.ours_budget_gib)
    config = Config(model=args.model, data=str(data[0]), eval_data=str(data[1]), rank=RANK, lr=lr, seed=seed,
                    steps=args.steps, batch_size=args.batch_size, max_length=TASKS[args.task][0],
                    eval_every=args.eval_every,
                    eval_samples=args.eval_samples, estimation_samples=args.estimation_samples,
                    estimation_batch_size=8, save_every=0,
                    gradient_checkpointing=False, progress=False, out=str(args.work / cache.stem), **settings)
    print(f"{method} lr {lr:g} seed {seed}", flush=True)
    if method == "full":
        metrics, model, tokenizer, device = full_finetune(config)
    elif method == "lora_ga_original":
        with patch("frugal_loraga.api.initial_factors", original_factors(config)):
            metrics = finetune(config).metrics
        model, tokenizer, device = peft_model(config)
    else:
        metrics = finetune(config).metrics
        model, tokenizer, device = peft_model(config)
    result = {"method": method, "lr": lr, "seed": seed, "eval_loss": metrics["eval_loss"],
              "train_loss": metrics["train_loss"], "tokens_per_second": metrics["tokens_per_second"],
              "init_seconds": metrics.get("init_seconds", 0.0), "estimation_groups": metrics.get("estimation_groups"),
              "corrected_layers": metrics.get("corrected_layers", 0),
              "accuracy": accuracy(model, tokenizer, data[1], args.accuracy_samples, device, args.task)}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cache.write_text(json.dumps(result))
    return result


def peft_model(config: Config):
    """The run's adapter on its base, through PEFT (the 4-bit base's export on a 4-bit base)."""
    from peft import PeftModel
    base, tokenizer, device = load_model(config)
    return PeftModel.from_pretrained(base, str(adapter_for(config.out, config.load_in_4bit))), tokenizer, device


def run_all(jobs: list[tuple[str, float, int]], args, data: tuple[Path, Path], save) -> None:
    """Run the jobs not yet cached, args.parallel at a time. On a GPU a run of this small model is bound by kernel
    launches, so several processes sharing the GPU finish a sweep several times sooner. Each child's log goes to
    --work/<run>.log; save() is called as each run ends."""
    if args.parallel == 1:
        for method, lr, seed in jobs:
            run(method, lr, seed, args, data)
            save()
        return

    def child(job):
        method, lr, seed = job
        log = args.work / f"{run_name(method, lr, seed)}.log"
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", f"{method}:{lr!r}:{seed}"],
                                  stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="2"))
        if done.returncode:
            print(f"{method} lr {lr:g} seed {seed} failed (exit {done.returncode}); see {log}", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        for _ in as_completed([pool.submit(child, job) for job in jobs]):
            save()


def fidelity(args, data: tuple[Path, Path]) -> dict:
    """Captured top-2r energy and r-dim subspace agreement of each estimate against the exact fp32 gradient."""
    settings = dict(model=args.model, data=str(data[0]), rank=RANK, estimation_samples=args.estimation_samples,
                    progress=False)
    reference = Config(load_in_4bit=False, dtype="float32", **settings)
    model, tokenizer, device = load_model(reference)
    examples, _ = load_examples(reference.data, "auto", tokenizer, TASKS[args.task][0])
    batches = estimation_batches(examples, reference, tokenizer.pad_token_id, device)
    targets = find_targets(model, reference.target_list(), RANK, "lora_ga")
    grads = exact_gradients(model, targets, batches)
    exact = top_singular(grads, 2 * RANK, "exact")
    budget = int(args.ours_budget_gib * 2**30)
    variants = {"randomized SVD, grouped (fp32 base)": (model, targets, "lowrank", budget, {})}
    for label, config, svd in (
            ("exact SVD, one group (bf16 base)", Config(load_in_4bit=False, **settings), "exact"),
            ("randomized SVD, grouped (NF4 base, uncorrected)", Config(load_in_4bit=True, nf4_error_rank=0, **settings),
             "lowrank"),
            ("ours: randomized SVD, grouped (NF4 base, corrected)", Config(load_in_4bit=True, **settings), "lowrank")):
        other, _, _ = load_model(config)
        found = find_targets(other, config.target_list(), RANK, "lora_ga")
        corrections, _ = initial_corrections(other, found, examples, config, str(demo_model_dir()) if args.model ==
                                             "demo" else args.model, tokenizer.pad_token_id, device)
        variants[label] = (other, found, svd, budget if svd == "lowrank" else 2**36, corrections)
    report = {}
    for label, (m, t, svd, budget_bytes, corrections) in variants.items():
        svds, stats = estimate_gradient_svd(m, t, batches, 2 * RANK, budget_bytes, svd, corrections=corrections)
        energy = [captured_energy(grads[n], s.U, s.V) for n, s in svds.items()]
        a0 = [subspace_agreement(exact[n].V[:, :RANK], s.V[:, :RANK]) for n, s in svds.items()]
        b0 = [subspace_agreement(exact[n].U[:, RANK:], s.U[:, RANK:]) for n, s in svds.items()]
        report[label] = {"groups": len(stats.groups), "layers": len(svds), "corrected_layers": len(corrections),
                         **{f"{k}_{stat}": f(v) for k, v in (("energy", energy), ("a0_agreement", a0),
                                                               ("b0_agreement", b0))
                            for stat, f in (("min", min), ("median", statistics.median))}}
        print(label, report[label], flush=True)
    return report


def steps_to_reach(curve: list, target: float) -> int | None:
    """First step whose eval loss is at or below target, or None."""
    return next((step for step, loss in curve if loss <= target), None)


def summarize(results: list[dict], grids: dict) -> dict:
    """Best lr per method (seed 0), its seeds' mean final eval loss and spread, and the steps the seeds' mean eval
    curve takes to reach the mean final eval loss of LoRA and of QLoRA."""
    summary = {}
    for method, lrs in grids.items():
        grid = {r["lr"]: r for r in results if r["method"] == method and r["seed"] == 0 and r["lr"] in lrs}
        if not grid:
            continue
        best = min(grid.values(), key=lambda r: r["eval_loss"][-1][1])
        seeds = [r for r in results if r["method"] == method and r["lr"] == best["lr"]]
        finals = [r["eval_loss"][-1][1] for r in seeds]
        mean_curve = [[step, statistics.mean(r["eval_loss"][i][1] for r in seeds)]
                      for i, (step, _) in enumerate(best["eval_loss"])]
        summary[method] = {"lr": best["lr"], "lr_grid": sorted(grid), "final_eval_loss": statistics.mean(finals),
                           "final_eval_loss_std": statistics.stdev(finals) if len(finals) > 1 else None,
                           "seeds": len(seeds), "accuracy": statistics.mean(r["accuracy"] for r in seeds),
                           "accuracy_std": statistics.stdev(r["accuracy"] for r in seeds) if len(seeds) > 1 else None,
                           "step0_eval_loss": best["eval_loss"][0][1],
                           "tokens_per_second": best["tokens_per_second"], "init_seconds": best["init_seconds"],
                           "curve": best["eval_loss"], "mean_curve": mean_curve, "train_curve": best["train_loss"]}
    for baseline in ("lora", "qlora"):  # plain LoRA on the same base precision as the bf16 and the NF4 methods
        if baseline in summary:
            target = summary[baseline]["final_eval_loss"]
            for s in summary.values():
                s[f"steps_to_{baseline}_final"] = steps_to_reach(s["mean_curve"], target + 1e-12)
    return summary


def plot(summary: dict, path: Path, task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, s in summary.items():
        label = f"{method} (lr {s['lr']:g})"
        left.plot(*zip(*s["mean_curve"]), color=COLORS[method], label=f"{label}, {s['seeds']} seeds", marker=".")
        steps, losses = zip(*s["train_curve"])
        smooth, ema = [], losses[0]
        for loss in losses:
            ema = 0.8 * ema + 0.2 * loss
            smooth.append(ema)
        right.plot(steps, smooth, color=COLORS[method], label=label)
    for axis, title in ((left, "held-out eval loss, mean of seeds"), (right, "train loss (EMA 0.8), seed 0")):
        axis.set_xlabel("optimizer step")
        axis.set_yscale("log")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend()
    what = {"arithmetic": "arithmetic word problems", "gsm": "GSM-style problems (reasoning-gym gsm_symbolic)"}[task]
    fig.suptitle(f"SmolLM2-135M-Instruct, {what}, rank 8, best lr per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict) -> str:
    early = [step for step, _ in next(iter(summary.values()))["mean_curve"][1:3]]
    rows = [f"| method | lr (grid) | eval loss at step 0 / {' / '.join(map(str, early))} | final eval loss (mean ± sd, "
            "seeds) | steps to LoRA's final | steps to QLoRA's final | accuracy (mean ± sd) | init s | train tok/s |",
            "|---|---|---|---|---|---|---|---|---|"]

    def steps(s, baseline):
        value = s.get(f"steps_to_{baseline}_final", "")
        return "not reached" if value is None else value

    for method, s in summary.items():
        sd = f" ± {s['final_eval_loss_std']:.4f}" if s["final_eval_loss_std"] is not None else ""
        accuracy_sd = f" ± {s['accuracy_std']:.1%}" if s.get("accuracy_std") is not None else ""
        rows.append(f"| {method} | {s['lr']:g} ({', '.join(f'{x:g}' for x in s['lr_grid'])}) | "
                    f"{' / '.join(f'{loss:.3f}' for _, loss in s['mean_curve'][:3])} | "
                    f"{s['final_eval_loss']:.4f}{sd} ({s['seeds']}) | {steps(s, 'lora')} | {steps(s, 'qlora')} | "
                    f"{s['accuracy']:.1%}{accuracy_sd} | {s['init_seconds']:.1f} | {s['tokens_per_second']:.0f} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--accuracy-samples", type=int, default=256)
    parser.add_argument("--estimation-samples", type=int, default=128)
    parser.add_argument("--ours-budget-gib", type=float, help="default: the task's, forcing several groups on the demo "
                        "model")
    parser.add_argument("--seeds", type=int, default=2, help="seeds for each method's picked lr")
    parser.add_argument("--all-seeds", action="store_true", help="every lr with every seed at once (one wave on a GPU "
                        "with room for them all), not seed 0 first")
    parser.add_argument("--lrs", default="", help="lrs of each grid to use, as a slice: 1:4 (default: all)")
    parser.add_argument("--work", type=Path, help="default: runs/convergence[_gsm]")
    parser.add_argument("--out", type=Path, help="default: bench/results/convergence[_gsm]")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the gradient fidelity measurement")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # method:lr:seed, one run (a --parallel child)
    parser.add_argument("--report", action="store_true", help="only summarize saved runs: table and plot")
    args = parser.parse_args()
    name = "convergence" + ("" if args.task == "arithmetic" else f"_{args.task}")
    args.work, args.out = args.work or ROOT / "runs" / name, args.out or RESULTS / name
    args.ours_budget_gib = args.ours_budget_gib or TASKS[args.task][3]
    args.work.mkdir(parents=True, exist_ok=True)
    start, _, stop = args.lrs.partition(":")
    grids = {m: METHODS[m][1][int(start or 0):int(stop) if stop else None] for m in args.methods.split(",")}
    saved = args.out.with_suffix(".json")
    if args.report:
        report = json.loads(saved.read_text())
        summary = summarize(report["runs"], grids)
        print(table(summary))
        plot(summary, args.out.with_suffix(".png"), args.task)
        return
    data = args.work / "train.jsonl", args.work / "test.jsonl"
    if args.one:  # the parent wrote the data
        method, lr, seed = args.one.split(":")
        run(method, float(lr), int(seed), args, data)
        return
    write_data(args.task, data, 1000, max(args.eval_samples, args.accuracy_samples))
    if args.model == "demo":
        demo_model_dir()  # converted once here, not by several children at a time
    fidelity_path = args.work / "fidelity.json"
    if saved.exists():  # runs finished elsewhere (another machine's sweep) are not run again
        for result in json.loads(saved.read_text())["runs"]:
            cache = args.work / f"{run_name(result['method'], result['lr'], result['seed'])}.json"
            if not cache.exists():
                cache.write_text(json.dumps(result))

    def save() -> dict:
        """Everything finished so far into --out (.json), so a sweep cut short still reports."""
        results = [json.loads(p.read_text()) for p in args.work.glob("*_seed*.json")]
        summary = summarize(results, grids)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({
            "settings": {k: str(v) for k, v in vars(args).items()},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "summary": summary, "fidelity": json.loads(fidelity_path.read_text()) if fidelity_path.exists() else {},
            "runs": results}, indent=1))
        return summary

    first = range(args.seeds) if args.all_seeds else [0]
    run_all([(m, lr, seed) for m, lrs in grids.items() for lr in lrs for seed in first], args, data, save)
    run_all([(m, s["lr"], seed) for m, s in save().items() for seed in range(1, args.seeds)], args, data, save)
    if not args.no_fidelity and not fidelity_path.exists():  # last: a sweep cut short keeps its runs
        fidelity_path.write_text(json.dumps(fidelity(args, data)))
    print(table(save()))

if __name__ == "__main__":
    main()
