"""The gradient estimate over two processes (gloo, on the CPU): each rank walks its share of the batches and every
rank ends with the same factors, bit for bit, those of all the batches; finetune itself refuses several processes."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from frugal_loraga import Config, ConfigError, finetune
from frugal_loraga.data import load_examples
from frugal_loraga.estimate import estimate_gradient_svd
from frugal_loraga.fidelity import captured_energy, exact_gradients
from frugal_loraga.init import estimation_batches
from frugal_loraga.lora import find_targets
from frugal_loraga.models import load_model
from conftest import SAMPLE, one_block_budget

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


def test_finetune_refuses_several_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2: finetune runs in one process, and 2 would each train and "
                                          "write the same out folder; start it with python"):
        finetune(Config(model="demo", data=str(SAMPLE), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
