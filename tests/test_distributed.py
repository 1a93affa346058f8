"""Two processes (gloo, on the CPU) against one: the gradient estimate, each rank walking its share of the batches
and every rank ending with the same factors, bit for bit, those of all the batches; and finetune, data parallel,
training as one process does with the same global batch."""
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from frugal_loraga import distributed

from frugal_loraga import Config, ConfigError, finetune
from frugal_loraga.data import load_examples
from frugal_loraga.estimate import estimate_gradient_svd
from frugal_loraga.fidelity import captured_energy, exact_gradients
from frugal_loraga.init import estimation_batches
from frugal_loraga.lora import find_targets
from frugal_loraga.models import load_model
from conftest import SAMPLE, free_port, one_block_budget

RANK = 2


def setup(model_dir):
    """The tiny model in fp32, its targets, and 5 estimation batches of 2 (3 for rank 0 of 2, 2 for rank 1)."""
    config = Config(model=str(model_dir), data=str(SAMPLE), rank=RANK, load_in_4bit=False, dtype="float32",
                    estimation_samples=10)
    model, tokenizer, device = load_model(config)
    examples, _ = load_examples(SAMPLE, "auto", tokenizer, 96)
    targets = find_targets(model, config.target_list(), config.rank, config.init)
    return model, targets, estimation_batches(examples, config, tokenizer.pad_token_id, device)


def estimate(model_dir):
    model, targets, batches = setup(model_dir)
    svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, one_block_budget(model, targets, batches),
                                        svd="exact")
    return {name: (s.U, s.S, s.V) for name, s in svds.items()}, stats


def estimate_in_rank(rank: int, size: int, init_file: str, model_dir, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        factors, stats = estimate(model_dir)
        torch.save({"factors": factors, "groups": stats.groups, "batches": stats.batches}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_every_rank_the_factors_of_all_batches(tiny_model_dir, tmp_path):
    mp.spawn(estimate_in_rank, args=(2, str(tmp_path / "init"), tiny_model_dir, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single, stats = estimate(tiny_model_dir)
    assert ranks[0]["groups"] == ranks[1]["groups"] == stats.groups and len(stats.groups) >= 2
    assert ranks[0]["batches"] == stats.batches == 5
    model, targets, batches = setup(tiny_model_dir)
    exact = exact_gradients(model, targets, batches)
    for name, (U, S, V) in ranks[0]["factors"].items():
        assert all(torch.equal(a, b) for a, b in zip((U, S, V), ranks[1]["factors"][name])), name
        torch.testing.assert_close(S, single[name][1], rtol=1e-5, atol=1e-7)
        assert captured_energy(exact[name], U, V) >= 0.9999, name


def finetune_in_rank(rank: int, size: int, port: int, config: Config, out):
    os.environ.update(WORLD_SIZE=str(size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        torch.save(finetune(config).metrics, out / f"metrics{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_as_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """grad_accum 2: one process runs both micro-batches of a step, each of two processes one of them. Plain LoRA
    init, so that both start from the same adapter bits (the estimate's sums differ in order, see above), then the
    summed gradients, every step and the adapter are the same (a loose 1e-6: fp32 sums in another order)."""
    config = Config(model=str(tiny_model_dir), data=str(SAMPLE), init="lora", rank=RANK, load_in_4bit=False,
                    dtype="float32",
                    steps=4, lr=5e-3, batch_size=2, grad_accum=2, estimation_samples=10, eval_every=2,
                    out=str(tmp_path / "one"), progress=False)
    one = finetune(config).metrics
    two = dataclasses.replace(config, out=str(tmp_path / "two"))
    mp.spawn(finetune_in_rank, args=(2, free_port(), two, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"metrics{r}.pt", weights_only=True) for r in range(2)]
    for metrics in ranks:
        assert metrics["train_tokens"] == one["train_tokens"]
        for key in ("train_loss", "eval_loss"):
            torch.testing.assert_close(torch.tensor(metrics[key]), torch.tensor(one[key]), rtol=1e-5, atol=1e-6)
    adapters = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_grad_accum_must_be_shared_by_the_processes(monkeypatch):
    monkeypatch.setattr(distributed, "rank_and_size", lambda: (0, 2))
    with pytest.raises(ConfigError, match=r"grad_accum=3 cannot be shared by 2 processes: make it a multiple of 2"):
        distributed.check_shares(3)
    distributed.check_shares(4)
