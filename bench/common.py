"""What the benchmark scripts share: the repository root (put on sys.path, so that `python bench/X.py` imports the
engine), the model shapes and their random-weight model folders, the benchmark data and its options, the output
options and result files, the card cap, the peaks a progress callback takes, and the two training setups measured
against each other (the QLoRA peer and our LoRA step). Scripts import from here, never from each other or the tests.

The benchmarks' tokenizer is bench/tokenizer.json: a 400-token byte-level BPE trained on data/sample.jsonl (saved from
tests/conftest.py's make_tokenizer at commit ad0f1fb). It is a file, not a builder, so that the benchmarks' token
counts stay those of their recorded results whatever the tests' tiny tokenizer becomes, and no script imports the
tests.
"""
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from frugal_loraga import Config  # noqa: E402
from frugal_loraga.init import initial_factors  # noqa: E402
from frugal_loraga.lora import find_targets, inject  # noqa: E402
from frugal_loraga.models import load_model  # noqa: E402
from frugal_loraga.progress import Phase  # noqa: E402
from frugal_loraga.train import autocast, make_optimizer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TOKENIZER = ROOT / "bench" / "tokenizer.json"
GIB = 2**30
SHAPES = {  # the model shapes the benchmarks build: (config class, its sizes)
    "llama2_7b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=32000)),
    "llama3_8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)),
    "qwen25_14b": ("Qwen2Config", dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                       num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)),
    "qwen3_30b_a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                             num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128, vocab_size=151936,
                                             tie_word_embeddings=False)),
}


def bench_tokenizer():
    """The benchmarks' tokenizer (bench/tokenizer.json, see the module docstring), pad = eos."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def make_model_dir(path: Path, layers: int, shape: str = "llama2_7b") -> Path:
    """A model folder of the shape, `layers` decoder layers, random bf16 weights as safetensors (built on the GPU)."""
    import transformers
    from transformers import AutoModelForCausalLM
    if (path / "config.json").exists():
        return path
    tokenizer = bench_tokenizer()
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


def add_output_args(parser, name: Optional[str], work: Optional[str] = None) -> None:
    """--name: the result file, bench/results/NAME.json (required where name is None); --work (where work is given):
    the folder for the script's model, data and runs."""
    parser.add_argument("--name", default=name, required=name is None, help="writes bench/results/NAME.json")
    if work is not None:
        parser.add_argument("--work", default=work, help="the folder for the model, data and runs (default: "
                            "%(default)s; a model folder found there is reused)")


def add_words_args(parser) -> None:
    """--max-words, and --min-words for examples of varying lengths: the data that words_data writes."""
    parser.add_argument("--min-words", type=int, help="examples of min-words to max-words words (of varying lengths, "
                        "as real data has) instead of max-words")
    parser.add_argument("--max-words", type=int, default=900)


def words_data(work: Path, rows: int, args) -> Path:
    """make_data's file for add_words_args' --min-words and --max-words, named for them."""
    return make_data(work / f"data{args.min_words or ''}_{args.max_words}.jsonl", rows, args.max_words, args.min_words)


def work_dir(path: str) -> Path:
    """The folder for a script's model, data and runs, made if missing."""
    work = Path(path)
    work.mkdir(parents=True, exist_ok=True)
    return work


def cap_card(card_gib: float) -> None:
    """Cap this process's CUDA memory at card_gib (at most the whole card): the GPU stands in for a smaller card."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(card_gib * GIB / total, 1.0))


def save_result(name: str, result: dict) -> Path:
    """Write bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=1))
    return out


def peaks(prefix: str) -> dict:
    """The CUDA allocator's peaks since the last reset, in GiB: reserved (what a real card must hold) and allocated."""
    return {f"{prefix}_peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            f"{prefix}_peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB}


class InitPeaks:
    """A progress callback, or part of one, that takes the init's peaks (peaks("init")) when training begins after
    the LoRA-GA estimate (training's first compiling or training report), then resets the peak counters, so that
    the peaks taken after finetune returns are training's."""

    def __init__(self):
        self.peaks: dict = {}
        self.estimated = False

    def __call__(self, phase, done, total, metrics) -> None:
        if phase == Phase.ESTIMATING:
            self.estimated = True
        elif phase in (Phase.COMPILING, Phase.TRAINING) and self.estimated and not self.peaks:
            self.peaks = peaks("init")
            torch.cuda.reset_peak_memory_stats()


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


def our_lora(model_dir: Path, data: Path, max_length: int, checkpointing: bool = True, reentrant: bool = False,
             dtype: torch.dtype = torch.bfloat16):
    """(model, optimizer, context) for our plain LoRA training step outside finetune: NF4, rank 8, paged AdamW 8-bit,
    the model's forward run inside context() (autocast to dtype); reentrant: reentrant checkpointing, as PEFT's
    default."""
    config = Config(model=str(model_dir), data=str(data), data_format="text", init="lora", rank=8,
                    max_length=max_length, optimizer="paged_adamw_8bit", gradient_checkpointing=checkpointing,
                    progress=False)
    model, tokenizer, device = load_model(config)
    config = config.resolve(device.type)  # the lr and sample counts finetune would use
    targets = find_targets(model, config.target_list(), 8, "lora")
    factors, _ = initial_factors(model, targets, [], config, tokenizer.pad_token_id, device, None)
    layers = inject(model, factors, config.eta)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.train()
    optimizer = make_optimizer([p for layer in layers.values() for p in (layer.A, layer.B)], config)
    return model, optimizer, lambda: autocast(device, dtype)


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
            "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB}


def top_events(events, attribute: str, count: int = 40) -> list:
    """[name, ms, calls] of torch.profiler's averaged events (prof.key_averages()) with the most time by `attribute`
    (in us: device_time_total, self_cpu_time_total)."""
    events = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)
    return [[e.key[:90], round(getattr(e, attribute) / 1000, 3), e.count] for e in events[:count]]
