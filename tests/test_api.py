"""End to end through finetune() and the CLI: resume, model and setting errors, out-of-memory, the demo run."""
import json
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import frugal_loraga.api as api_module
from frugal_loraga import Config, ConfigError, OutOfMemory, Phase, finetune
from frugal_loraga.cli import main
from frugal_loraga.estimate import GradientTap
from frugal_loraga.models import load_base
from conftest import write_jsonl


def tiny_config(model_dir, data, out, **kw):
    settings = dict(model=str(model_dir), data=str(data), rank=4, steps=6, lr=3e-3, estimation_samples=8,
                    eval_every=2, save_every=2, out=str(out), progress=False)
    return Config(**{**settings, **kw})


def test_the_estimate_shows_a_progress_bar_and_reports_to_the_callback(tiny_model_dir, sample_path, tmp_path, capsys):
    seen = []
    result = finetune(tiny_config(tiny_model_dir, sample_path, tmp_path / "run", steps=1, progress=True,
                                  grad_budget_gib=0.0015, dtype="float32"),  # fp32 costs: > 1 group
                      progress=lambda phase, done, total, metrics: seen.append((phase, done, total)))
    total = result.metrics["estimation_groups"] * result.metrics["estimation_batches"]
    assert result.metrics["estimation_groups"] > 1
    assert [s for s in seen if s[0] == "estimating gradients"][-1] == ("estimating gradients", total, total)
    compiling = "compiling the decoder layers" if torch.cuda.is_available() else None  # compile is on by default
    correcting = "correcting the 4-bit error"  # load_in_4bit and nf4_error_rank are on by default; 2 blocks, 1 group
    parts = [(correcting, done, 28) for done in (0, 14, *range(15, 29))]  # 14 layers: the group's forwards, each SVD
    assert seen[:2 + len(parts) + 1] == [("loading data", 0, 0), ("loading the model", 0, 0), *parts,
                                         (compiling or "estimating gradients", 0, total)]
    assert (compiling or "training", 0, 1) in seen and seen[-2:] == [("training", 1, 1), ("saving the adapter", 0, 0)]
    assert {type(phase) for phase, _, _ in seen} == {Phase}  # each a Phase, equal to its text as the asserts show
    bars = capsys.readouterr().err
    assert "4-bit error correction: 100%" in bars and "LoRA-GA gradient estimate: 100%" in bars


def test_interrupted_run_resumes_to_the_same_adapter(tiny_model_dir, sample_path, tmp_path):
    straight = finetune(tiny_config(tiny_model_dir, sample_path, tmp_path / "a"))
    stop = threading.Event()
    stopped = finetune(tiny_config(tiny_model_dir, sample_path, tmp_path / "b"),
                       progress=lambda phase, done, total, metrics: phase == "training" and done == 3 and stop.set(), stop=stop)
    assert stopped.stopped and len(stopped.metrics["train_loss"]) == 3
    resumed = finetune(tiny_config(tiny_model_dir, sample_path, tmp_path / "b", resume=True))
    assert not resumed.stopped
    assert resumed.metrics["train_loss"] == straight.metrics["train_loss"]
    assert resumed.metrics["eval_loss"] == straight.metrics["eval_loss"]
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layers_that_keep_their_activations_train_as_recomputed_ones(tiny_model_dir, sample_path, tmp_path):
    """keep_activations_gib=0 recomputes both layers in backward, 1 GiB keeps both layers' activations: the same
    losses and adapter either way."""
    recomputed = finetune(tiny_config(tiny_model_dir, sample_path, tmp_path / "a", keep_activations_gib=0))
    kept = finetune(tiny_config(tiny_model_dir, sample_path, tmp_path / "b", keep_activations_gib=1))
    assert (recomputed.metrics["recomputed_layers"], kept.metrics["recomputed_layers"]) == (2, 0)
    assert kept.metrics["train_loss"] == recomputed.metrics["train_loss"]
    a = load_file(recomputed.adapter_dir / "adapter_model.safetensors")
    b = load_file(kept.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the fused AdamW is CUDA's"))])
def test_adamw_is_fused_on_cuda(device):
    """One kernel a step for all the factors on CUDA; torch's default elsewhere."""
    from frugal_loraga.train import make_optimizer
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2, device=device))],
                               Config(data="-", model="x", lr=1e-4))
    assert isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults["fused"]) == (device == "cuda")


def test_stop_ends_the_estimate_after_the_current_batch(tiny_model_dir, sample_path, tmp_path):
    stop, batches = threading.Event(), []

    def progress(phase, done, total, metrics):
        if phase == "estimating gradients" and done:
            batches.append(done)
            stop.set()
    result = finetune(tiny_config(tiny_model_dir, sample_path, tmp_path / "run"), progress=progress, stop=stop)
    assert result.stopped and result.adapter_dir is None and batches == [1]
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_resume_with_other_settings_is_refused(tiny_model_dir, sample_path, tmp_path):
    stop = threading.Event()
    finetune(tiny_config(tiny_model_dir, sample_path, tmp_path, steps=2), stop=stop,
             progress=lambda phase, done, total, metrics: phase == "training" and done == 1 and stop.set())
    with pytest.raises(ConfigError, match="written with other settings or inputs for lr, rank"):
        finetune(tiny_config(tiny_model_dir, sample_path, tmp_path, steps=2, rank=2, lr=1e-3, resume=True))


def test_cli_trains_and_writes_metrics(tiny_model_dir, sample_path, tmp_path, capsys):
    metrics_path = tmp_path / "m.json"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(sample_path), "--init", "lora_ga",
                 "--rank", "2", "--steps", "3", "--estimation-samples", "4", "--out", str(tmp_path / "run"),
                 "--metrics-json", str(metrics_path), "--no-progress", "--no-load-in-4bit"])
    assert code == 0
    metrics = json.loads(metrics_path.read_text())
    for key in ("train_loss", "eval_loss", "init_seconds", "train_seconds", "tokens_per_second", "peak_memory_gib"):
        assert key in metrics
    assert [s for s, _ in metrics["train_loss"]] == [1, 2, 3]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert json.loads(capsys.readouterr().out)["adapter"].endswith("adapter")


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
    (["--model", __file__], f"model folder {__file__} is a file, not a folder; give 'demo', a local folder"),
    (["--rank", "0"], "rank must be at least 1"),
    (["--data", "/nonexistent.jsonl"], "data file /nonexistent.jsonl does not exist"),
    (["--target-modules", "embed_tokens"], "only linear layers and mixture-of-experts expert stacks can be adapted"),
    (["--rank", "64"], "rank 64 is too large"),
    (["--grad-budget-gib", "0.000001"], "smaller than what the estimate holds for decoder layer .* raise grad_budget_gib"),
])
def test_cli_reports_bad_input(tiny_model_dir, sample_path, tmp_path, capsys, args, message):
    base = ["train", "--model", str(tiny_model_dir), "--data", str(sample_path), "--steps", "1",
            "--estimation-samples", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(base + args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_model_folder_checks(tmp_path, sample_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "resnet"}')
    with pytest.raises(ConfigError, match="'resnet' model, which is not a causal language model"):
        finetune(Config(model=str(tmp_path / "bert"), data=str(sample_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        finetune(Config(model=str(tmp_path / "empty"), data=str(sample_path)))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="no .safetensors weights; only safetensors load"):
        finetune(Config(model=str(tmp_path / "pickled"), data=str(sample_path)))


def test_out_of_memory_names_the_settings_to_lower(tiny_model_dir, sample_path, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr("frugal_loraga.init.estimate_gradient_svd", oom)
    with pytest.raises(OutOfMemory, match="while estimating gradients.*estimation_batch_size and grad_budget_gib"):
        finetune(tiny_config(tiny_model_dir, sample_path, tmp_path))


@pytest.mark.parametrize("several_widths", [True, False])
def test_batches_of_several_widths_run_without_cudnn_attention(tiny_model_dir, tmp_path, monkeypatch, several_widths):
    """cuDNN's attention plans anew for each sequence length: on examples of several lengths the estimate, training
    and eval run without it, on examples of one length with it (but for the estimate's short probe of the layer order,
    never), and the setting is restored afterwards. Batches are padded to a multiple of 8 tokens (the compiled layers
    guard on the width mod 8)."""
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "the cat sat " * (1 + several_widths * (i % 5))}
                                                 for i in range(24)])
    seen = []  # (estimating, batch width, cuDNN attention allowed) per decoder layer call

    def record(layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((isinstance(layer.mlp.down_proj, GradientTap), hidden.shape[1],
                     torch.backends.cuda.cudnn_sdp_enabled()))

    def load_and_watch(config, path):
        model, device = load_base(config, path)
        for layer in model.model.layers:
            layer.register_forward_pre_hook(record, with_kwargs=True)
        return model, device

    monkeypatch.setattr(api_module, "load_base", load_and_watch)
    finetune(tiny_config(tiny_model_dir, data, tmp_path / "run", steps=3, nf4_error_rank=0))  # correction: test_nf4_error
    probe = next(i for i, (estimating, _, _) in enumerate(seen) if estimating)  # the estimate's 8-token probe first
    assert probe > 0 and not any(allowed for _, _, allowed in seen[:probe])
    seen = seen[probe:]
    assert {estimating for estimating, _, _ in seen} == {True, False}
    assert (len({width for _, width, _ in seen}) > 1) == several_widths
    assert all(width % 8 == 0 for _, width, _ in seen)
    assert {allowed for _, _, allowed in seen} == {not several_widths}
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("setting, message", [
    (dict(load_in_4bit="no"), "load_in_4bit needs true or false, got 'no'"),  # a non-empty string is truthy
    (dict(rank=2.5), "rank needs a whole number, got 2.5"),
    (dict(rank="8"), "rank needs a whole number, got '8'"),
    (dict(steps=True), "steps needs a whole number, got True"),
    (dict(lr="1e-4"), "lr needs a number, got '1e-4'"),
    (dict(target_modules=None), "target_modules needs text, got None"),
    (dict(data=123), "data needs text, got 123"),
    (dict(model=" "), "model is empty; give 'demo', a model folder or a hub id"),
    (dict(out=""), "out is empty; give a folder for the run"),  # it would write the run where Python runs
])
def test_a_setting_of_the_wrong_kind_is_refused_by_name(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**{"data": "x", **setting})


def test_settings_take_paths_and_any_number_type():
    import numpy as np
    config = Config(data=Path("d.jsonl"), out=Path("runs/x"), rank=np.int64(4), lr=1, alpha=np.float32(8),
                    load_in_4bit=np.bool_(False))
    assert (config.data, config.out, config.rank, config.lr, config.alpha) == ("d.jsonl", "runs/x", 4, 1.0, 8.0)
    assert [type(v) for v in (config.data, config.rank, config.lr, config.alpha)] == [str, int, float, float]
    assert config.load_in_4bit is False
    with pytest.raises(ConfigError, match="rank needs"):  # a bool is not a number, numpy's neither
        Config(data="x", rank=np.bool_(True))


def test_config_validation():
    with pytest.raises(ConfigError, match="init='lora-ga' is not one of lora_ga, lora"):
        Config(data="x", init="lora-ga")
    with pytest.raises(ConfigError, match="warmup_ratio must be in"):
        Config(data="x", warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="no training data"):
        Config()
    with pytest.raises(ConfigError, match=r"lr must be a positive finite number \(at most 3.403e\+38\), got inf"):
        Config(data="x", lr=float("inf"))
    with pytest.raises(ConfigError, match="lr needs a number within a float's range, got 1000"):
        Config(data="x", lr=10**400)
    assert Config(data="x", alpha=16, rank=4).eta == 8.0
    cpu, cuda = Config(data="x").resolve("cpu"), Config(data="x").resolve("cuda")
    assert (cpu.estimation_samples, cpu.eval_samples, cuda.estimation_samples, cuda.eval_samples) == (16, 16, 128, 64)
    assert Config(data="x", estimation_samples=32).resolve("cpu").estimation_samples == 32
    assert (Config(data="x").resolve("cpu").lr, Config(data="x", init="lora").resolve("cpu").lr) == (3e-5, 3e-4)
    assert Config(data="x", lr=1e-3).resolve("cuda").lr == 1e-3
    started = {"lr": 1e-3, "estimation_samples": 128, "eval_samples": 64}  # a run started on a GPU, resumed on a CPU
    resumed = Config(data="x").resolve("cpu", started)
    assert (resumed.lr, resumed.estimation_samples, resumed.eval_samples) == (1e-3, 128, 64)
    assert Config(data="x", alpha=16, rank=4, use_rslora=False).eta == 4.0


def test_demo_run_lowers_eval_loss(sample_path, tmp_path):
    """The README's demo: embedded SmolLM2-135M-Instruct in NF4, the shipped sample data, a few dozen steps on CPU."""
    result = finetune(Config(model="demo", data=str(sample_path), steps=24, estimation_samples=16, eval_every=12,
                             eval_samples=16, out=str(tmp_path / "demo"), progress=False))
    losses = [loss for _, loss in result.metrics["eval_loss"]]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
