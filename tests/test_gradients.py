"""The streamed gradient estimate against the exact oracle: full autograd gradients + torch.linalg.svd."""
import contextlib
import functools
import os

import pytest
import torch
from torch._dynamo.utils import counters
from bitsandbytes.functional import dequantize_4bit

from frugal_loraga.init import estimation_batches
from frugal_loraga.config import Config, ConfigError
from frugal_loraga.data import causal_inputs, collate, load_examples
from frugal_loraga.fidelity import captured_energy, exact_gradients, subspace_agreement
from frugal_loraga.blocks import block_layout, compile_blocks, enable_checkpointing, keep_compiled_graphs, uncompile_blocks
from frugal_loraga.estimate import accumulate_outer, estimate_gradient_svd
from frugal_loraga.estimate.plan import Segment, plan_cache, plan_groups, plan_segments
from frugal_loraga.memory import activation_bytes, gradient_bytes, layer_costs
from frugal_loraga.lora import find_targets
from frugal_loraga.models import load_model
from conftest import make_tiny_model_dir, one_block_budget

RANK = 4


def load(model_dir, four_bit, rank=RANK, checkpointing=False):
    """fp32 compute on every device (the oracles' tolerances are for fp32), on the GPU when there is one."""
    config = Config(model=str(model_dir), data="unused", load_in_4bit=four_bit, rank=rank, dtype="float32")
    model, tokenizer, _ = load_model(config)
    if checkpointing:
        enable_checkpointing(model)
    return model, tokenizer, find_targets(model, config.target_list(), rank, "lora_ga")


def make_batches(model, tokenizer, sample_path, n_batches=4, size=2, max_length=96, width=None):
    examples, _ = load_examples(sample_path, "auto", tokenizer, max_length)
    return [collate(examples[i * size:(i + 1) * size], tokenizer.pad_token_id, model.device, width)
            for i in range(n_batches)]


@contextlib.contextmanager
def grad_runs(blocks):
    """Within it, the list of block calls as whether their output needs grad (builds a graph, keeps activations)."""
    runs = []
    hooks = [b.register_forward_hook(lambda m, args, out: runs.append((out[0] if isinstance(out, tuple) else out)
                                                                     .requires_grad)) for b in blocks]
    try:
        yield runs
    finally:
        for hook in hooks:
            hook.remove()


def assert_faithful(svds, grads, k, bar=0.99):
    assert set(svds) == set(grads)
    for name, G in grads.items():
        energy = captured_energy(G, svds[name].U[:, :k], svds[name].V[:, :k])
        assert energy >= bar, f"{name}: captured {energy:.4f} of the exact top-{k} gradient energy"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_outer_adds_the_weight_gradient_in_place(dtype):
    """acc += dY^T X for batched dY (..., m) and X (..., n), against a float64 product of the same inputs; the op's
    schema, fake tensor and in-place update as torch.compile checks them. On a GPU 16-bit inputs go through cuBLAS
    into the fp32 acc, elsewhere through fp32 addmm_."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dy, x = torch.randn(2, 37, 70, device=device).to(dtype), torch.randn(2, 37, 50, device=device).to(dtype)
    acc = torch.randn(70, 50, device=device)
    expected = acc.double() + dy.reshape(-1, 70).double().T @ x.reshape(-1, 50).double()
    torch.library.opcheck(accumulate_outer, (acc.clone(), dy, x))
    address = acc.data_ptr()
    accumulate_outer(acc, dy, x)
    assert acc.data_ptr() == address and acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-4)


def test_streamed_estimate_matches_exact_svd_fp32(tiny_model_dir, sample_path):
    model, tokenizer, targets = load(tiny_model_dir, four_bit=False)
    batches = make_batches(model, tokenizer, sample_path)
    grads = exact_gradients(model, targets, batches)
    svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget_bytes=2**30)
    assert len(stats.groups) == 1
    assert_faithful(svds, grads, 2 * RANK)
    for name, G in grads.items():  # singular values too, not only the subspaces
        torch.testing.assert_close(svds[name].S, torch.linalg.svdvals(G)[:2 * RANK], rtol=1e-3, atol=1e-6)


def test_streamed_estimate_on_nf4_base_with_checkpointing(deep_model_dir, sample_path):
    """G at the quantized model: the oracle is an fp32 model holding the dequantized NF4 weights. The estimate runs
    without checkpointing and leaves the model as it found it: its own layers in place, checkpointing on."""
    model4, tokenizer, targets4 = load(deep_model_dir, four_bit=True, checkpointing=True)
    batches = make_batches(model4, tokenizer, sample_path)
    modules = dict(model4.named_modules())
    budget = one_block_budget(model4, targets4, batches)
    with grad_runs(model4.model.layers) as runs:
        svds, stats = estimate_gradient_svd(model4, targets4, batches, 2 * RANK, budget)
    assert len(stats.groups) == 4
    assert sum(runs) == len(model4.model.layers) * len(batches)  # each block with grad once per batch, no more
    assert dict(model4.named_modules()) == modules
    assert all(block.gradient_checkpointing for block in model4.model.layers)
    model, _, targets = load(deep_model_dir, four_bit=False)
    with torch.no_grad():
        for name, m in targets.items():
            q = targets4[name].weight
            m.weight.copy_(dequantize_4bit(q.data, q.quant_state).float())
    assert_faithful(svds, exact_gradients(model, targets, batches), 2 * RANK)


def test_estimation_batches_take_their_own_widths_and_the_padding_changes_no_gradient(tiny_model_dir, sample_path):
    """Each estimation batch is padded to its own longest example, rounded up to a multiple of 8, and carries no
    attention mask, and the exact gradients are those of the same examples in batches cut to their longest example,
    with their masks."""
    model, tokenizer, targets = load(tiny_model_dir, four_bit=False)
    config = Config(model=str(tiny_model_dir), data=str(sample_path), estimation_samples=12, max_length=96)
    examples, _ = load_examples(sample_path, "auto", tokenizer, 96)
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, model.device)
    assert all(set(b) == {"input_ids", "labels"} for b in batches)
    tight = []
    for b in batches:
        mask = (b["input_ids"] != tokenizer.pad_token_id).long()  # the sample data ends no example with a pad token
        longest = int(mask.sum(1).max())
        assert b["input_ids"].shape[1] == -(-longest // 8) * 8
        tight.append({"input_ids": b["input_ids"][:, :longest], "labels": b["labels"][:, :longest],
                      "attention_mask": mask[:, :longest]})
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    assert any(b["input_ids"].shape[1] > t["input_ids"].shape[1] for b, t in zip(batches, tight))
    assert any(bool((t["attention_mask"] == 0).any()) for t in tight)
    padded, exact = exact_gradients(model, targets, batches), exact_gradients(model, targets, tight)
    for name in targets:
        torch.testing.assert_close(padded[name], exact[name], rtol=1e-4, atol=1e-6)


def test_gradient_state_stays_within_a_small_budget(deep_model_dir, sample_path):
    model, tokenizer, targets = load(deep_model_dir, four_bit=False)
    batches = make_batches(model, tokenizer, sample_path)
    budget = one_block_budget(model, targets, batches)
    svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget_bytes=budget)
    assert len(stats.groups) == 4
    assert 0 < stats.peak_state_bytes <= budget
    assert sorted(n for g in stats.groups for n in g) == sorted(targets)
    assert_faithful(svds, exact_gradients(model, targets, batches), 2 * RANK)


def test_groups_hold_whole_blocks_while_they_fit_and_parts_of_a_block_that_does_not():
    """Reverse execution order, cut between blocks (and around layers outside them) while a block fits whole. A block
    that does not is cut into parts, groups of their own, each holding its layers' gradients and the whole block's
    activations (a part runs the whole block). Bytes of fp32 gradient and of activations per layer; a block holds 40,
    16 of them activations, and the head 5."""
    order = ["b0.attn", "b0.gate", "b0.mlp", "b1.attn", "b1.gate", "b1.mlp", "head"]
    sizes = {"attn": (6, 4), "gate": (6, 4), "mlp": (12, 8)}  # gradient, activations
    index = {"head": None, **{f"b{i}.{n}": i for i in (0, 1) for n in sizes}}
    gradients = {"head": 3, **{f"b{i}.{n}": g for i in (0, 1) for n, (g, _) in sizes.items()}}
    activations = {"head": 2, **{f"b{i}.{n}": a for i in (0, 1) for n, (_, a) in sizes.items()}}
    plan = functools.partial(plan_groups, order, gradients, activations, index)
    assert plan(budget_bytes=45) == [["head", "b1.mlp", "b1.gate", "b1.attn"], ["b0.mlp", "b0.gate", "b0.attn"]]
    assert plan(budget_bytes=40) == [["head"], ["b1.mlp", "b1.gate", "b1.attn"], ["b0.mlp", "b0.gate", "b0.attn"]]
    assert plan(budget_bytes=39) == [["head"], ["b1.mlp", "b1.gate"], ["b1.attn"], ["b0.mlp", "b0.gate"], ["b0.attn"]]
    assert plan(budget_bytes=28) == [["head"], ["b1.mlp"], ["b1.gate", "b1.attn"], ["b0.mlp"], ["b0.gate", "b0.attn"]]
    # a larger block 1 (52 bytes) is cut into parts, and block 0 (40), which fits, stays whole
    bigger = functools.partial(plan_groups, order, {**gradients, "b1.mlp": 24}, activations, index)
    assert bigger(budget_bytes=45) == [["head"], ["b1.mlp"], ["b1.gate", "b1.attn"], ["b0.mlp", "b0.gate", "b0.attn"]]


def test_a_budget_below_one_layer_and_its_block_activations_is_refused_naming_the_layer():
    order = ["b0.attn", "b0.mlp", "head"]
    index = {"b0.attn": 0, "b0.mlp": 0, "head": None}
    gradients, activations = {"b0.attn": 2**30, "b0.mlp": 2**31, "head": 2**29}, dict.fromkeys(order, 2**28)
    plan_groups(order, gradients, activations, index, budget_bytes=2**31 + 2**29)  # b0.mlp beside the block's 0.5 GiB
    with pytest.raises(ConfigError, match=r"^grad_budget_gib=2.5 is smaller than what the estimate holds for decoder "
                                          r"layer 0 with only b0.mlp tapped \(2.5 GiB: that layer's fp32 gradient and "
                                          r"the activations of the whole decoder layer, which it runs\); raise "
                                          "grad_budget_gib or lower estimation_batch_size$"):
        plan_groups(order, gradients, activations, index, budget_bytes=2**31 + 2**29 - 1)
    with pytest.raises(ConfigError, match=r"holds for head \(0.75 GiB of fp32 gradient and activations\); raise"):
        plan_groups(order, gradients, activations, index, budget_bytes=2**29)


def test_layer_costs_count_the_fp32_gradient_and_the_activations():
    assert gradient_bytes({"q": (64, 32)}) == {"q": 4 * 64 * 32}
    assert activation_bytes({"q": (64, 32)}, tokens=10, element_size=2) == {"q": 2 * 10 * 96 * 2}
    assert layer_costs({"q": (64, 32)}, tokens=10, element_size=2) == {"q": 4 * 64 * 32 + 2 * 10 * 96 * 2}


def test_segments_bound_each_backward(sample_path):
    """Top-down groups over 6 blocks and a head layer: the top group runs to the loss, each lower group runs its
    blocks up to the block the group above starts at, the blocks between groups included."""
    index = {"head": None, "b5.mlp": 5, "b5.attn": 5, "b4.mlp": 4, "b4.attn": 4, "b1.mlp": 1, "b0.mlp": 0}
    groups = [["head", "b5.mlp", "b5.attn"], ["b4.mlp", "b4.attn"], ["b1.mlp"], ["b0.mlp"]]
    assert plan_segments(groups, index) == [Segment(groups[0], 5, None, records=True),
                                            Segment(groups[1], 4, 5, records=True),
                                            Segment(groups[2], 1, 4, records=True), Segment(groups[3], 0, 1)]
    # the top group's forward keeps the lower starts but block 0's (the embeddings give it), fewer on a short budget
    assert plan_cache(plan_segments(groups, index), input_bytes=10, host_budget_bytes=25) == [1, 4]
    assert plan_cache(plan_segments(groups, index), input_bytes=10, host_budget_bytes=15) == [4]
    # below a group that holds a layer outside the blocks and starts at the embeddings, a group runs to the loss
    assert plan_segments([["b5.mlp", "head"], ["b4.mlp"]], index)[1] == Segment(["b4.mlp"], 4, None)
    # blocks cut into parts: each part runs its block's range from the same upstream gradient (the top block's parts
    # from the loss), and the last part records the gradient at the block's input for the group below
    parts = [["b5.mlp"], ["b5.attn"], ["b4.mlp"], ["b4.attn"], ["b1.mlp"], ["b0.mlp"]]
    assert plan_segments(parts, index) == [Segment(parts[0], 5, None), Segment(parts[1], 5, None, records=True),
                                           Segment(parts[2], 4, 5), Segment(parts[3], 4, 5, records=True),
                                           Segment(parts[4], 1, 4, records=True), Segment(parts[5], 0, 1)]
    assert plan_cache(plan_segments(parts, index), input_bytes=10, host_budget_bytes=25) == [1, 4]


def no_grad_runs_to_reach_starts(kept: list[int], starts) -> int:
    """Blocks run without grad to get each start's input: from the nearest kept start at or below it, else from the
    embeddings (block 0's input)."""
    return sum(s - max([c for c in kept if c <= s], default=0) for s in starts)


def test_kept_inputs_are_spread_so_that_the_groups_between_run_few_blocks():
    """32 one-block groups, the top one holding block 31: with room for 8 of the lower starts kept, the groups reach
    their starts with 39 no-grad block runs a batch, against 253 if the 8 highest were kept and the rest re-ran the
    forward from the embeddings."""
    index = {f"b{i}": i for i in range(32)}
    segments = plan_segments([[f"b{i}"] for i in reversed(range(32))], index)
    kept = plan_cache(segments, input_bytes=1, host_budget_bytes=8)
    assert kept == [3, 7, 10, 14, 17, 21, 24, 28]
    assert no_grad_runs_to_reach_starts(kept, range(1, 31)) == 39
    assert no_grad_runs_to_reach_starts(list(range(23, 31)), range(1, 31)) == 253
    assert plan_cache(segments, input_bytes=1, host_budget_bytes=0) == []
    assert plan_cache(segments, input_bytes=1, host_budget_bytes=30) == list(range(1, 31))


@pytest.mark.parametrize("kept_starts", [0, 2, 6])
def test_groups_start_from_kept_inputs_and_run_the_blocks_between(tmp_path_factory, sample_path, kept_starts):
    """Eight decoder layers, one group each. The lower groups' inputs come from what the top group's forward kept on
    the CPU: all six starts above block 0, two of them (the groups between run the blocks from the nearest kept start
    below), or none (each re-runs the forward from the embeddings). Same factors (exact SVD of the same gradients)
    every time, and exactly the no-grad block runs the plan says."""
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-8"), layers=8)
    model, tokenizer, targets = load(model_dir, four_bit=False)
    batches = make_batches(model, tokenizer, sample_path)
    budget = one_block_budget(model, targets, batches)
    input_bytes = sum(b["input_ids"].numel() for b in batches) * model.config.hidden_size * 4
    with grad_runs(model.model.layers) as runs:
        svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget, "exact",
                                            host_budget_bytes=kept_starts * input_bytes)
    assert len(stats.groups) == 8
    kept = {6: [1, 2, 3, 4, 5, 6], 2: [2, 5], 0: []}[kept_starts]
    top_forward = 7  # blocks 0..6 below the top group's block 7
    order = 8  # the short forward that finds the layers' execution order, once
    assert runs.count(False) == order + (top_forward + no_grad_runs_to_reach_starts(kept, range(1, 7))) * len(batches)
    assert runs.count(True) == 8 * len(batches)
    exact = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget, "exact", host_budget_bytes=0)[0]
    for name in targets:
        for got, expected in zip((svds[name].U, svds[name].S, svds[name].V),
                                 (exact[name].U, exact[name].S, exact[name].V)):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kept", [[1, 2], [2], []])
def test_blocks_cut_into_parts_give_the_factors_of_one_group(deep_model_dir, sample_path, kept):
    """A budget below one decoder layer, but that holds its two largest layers' gradients beside its activations:
    each of the four blocks is cut into three parts, each a group that runs its whole block with grad and taps only
    its own layers. The top block's parts each backpropagate from the loss, a lower block's parts from the gradient
    recorded at the input of the block above, and a block's last part records the gradient at its input. The lower
    blocks' start inputs are all kept, one (block 1's parts then re-run the forward from the embeddings) or none.
    The factors equal those of one group over every layer; each block runs with grad once per part and batch, and
    without grad as the plan says; the progress counts every group's batches."""
    model, tokenizer, targets = load(deep_model_dir, four_bit=False)
    batches = make_batches(model, tokenizer, sample_path)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    activations = activation_bytes(shapes, max(b["input_ids"].numel() for b in batches), 4)
    budget = sum(a for n, a in activations.items() if n.startswith("model.layers.3.")) + 2 * 4 * 64 * 96
    input_bytes = sum(b["input_ids"].numel() for b in batches) * model.config.hidden_size * 4
    progress = []
    with grad_runs(model.model.layers) as runs:
        svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget, "exact",
                                            lambda phase, done, total, _: progress.append((done, total)),
                                            host_budget_bytes=len(kept) * input_bytes)
    assert stats.groups == [[f"model.layers.{i}.{name}" for name in part] for i in (3, 2, 1, 0) for part in (
        ["mlp.down_proj", "mlp.up_proj"], ["mlp.gate_proj", "self_attn.o_proj", "self_attn.v_proj"],
        ["self_attn.k_proj", "self_attn.q_proj"])]
    assert 0 < stats.peak_state_bytes <= budget
    assert runs.count(True) == 3 * 4 * len(batches)
    order, top_forwards = 4, 3 * 3  # the layer-order probe; each top part's forward runs blocks 0-2 without grad
    assert runs.count(False) == order + (top_forwards + 3 * no_grad_runs_to_reach_starts(kept, [1, 2])) * len(batches)
    assert progress[-1] == (12 * len(batches), 12 * len(batches))
    one_group, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, 2**30, "exact")
    assert len(stats.groups) == 1
    for name in targets:
        for got, expected in zip((svds[name].U, svds[name].S, svds[name].V),
                                 (one_group[name].U, one_group[name].S, one_group[name].V)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_output_head_in_a_group_of_its_own(deep_model_dir, sample_path):
    """lm_head targeted, with a budget that holds it alone: the top group is the head, whose backward stops at its
    input (no block runs with grad for it), the group below runs from the loss, and the groups under it run their
    blocks from inputs the head's forward kept."""
    config = Config(model=str(deep_model_dir), data="unused", load_in_4bit=False, rank=RANK, dtype="float32",
                    target_modules="q_proj,down_proj,lm_head")
    model, tokenizer, _ = load_model(config)
    targets = find_targets(model, config.target_list(), RANK, "lora_ga")
    batches = make_batches(model, tokenizer, sample_path)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    head = layer_costs(shapes, max(b["input_ids"].numel() for b in batches), 4)["lm_head"]
    with grad_runs(model.model.layers) as runs:
        svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, head)
    assert stats.groups[0] == ["lm_head"] and len(stats.groups) == 5
    assert sum(runs) == len(model.model.layers) * len(batches)
    assert_faithful(svds, exact_gradients(model, targets, batches), 2 * RANK)


def test_blocks_with_inputs_of_their_own_in_several_groups():
    """Gemma 3 alternates sliding-window and global layers, each kind with its own attention mask and rotary
    embeddings. A lower group that runs two blocks gives each its own inputs: the estimate over two groups of two
    blocks (and over four of one) matches the exact gradients. A window of 8 tokens over 40 makes the kinds differ;
    run with the first block's inputs for both, layer 0's q_proj captured only 0.87 of the energy."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"] * 2, use_cache=False)
    model = Gemma3ForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    targets = find_targets(model, ["all-linear"], RANK, "lora_ga")
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 300, (2, 40))
        mask = torch.ones_like(ids)
        mask[1, 30:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    grads = exact_gradients(model, targets, batches)
    block = one_block_budget(model, targets, batches)
    for budget, groups in ((2 * block, 2), (block, 4)):
        svds, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget, "exact",
                                            host_budget_bytes=0 if groups == 2 else None)
        assert len(stats.groups) == groups
        assert_faithful(svds, grads, 2 * RANK, bar=0.9999)


@pytest.mark.parametrize("width,four_bit", [(96, False), (None, False), (96, True)])
def test_compiled_estimate_matches_eager_from_a_few_graphs(deep_model_dir, sample_path, width, four_bit, monkeypatch):
    """The blocks compiled for the estimate (inductor on CUDA; on CPU aot_eager: dynamo and AOTAutograd as on CUDA,
    without inductor's code generation): the eager factors, with no graph break, from 2 graphs for four blocks in four
    groups (the top group's forward below its blocks, and a tapped block), whether the batches share one width (as
    the estimation batches do) or not (then compiled for any width), on a 4-bit base too (its weights dequantized in
    the graphs, and again in backward), and the blocks left uncompiled. Compared as
    rank-k reconstructions, which singular-vector signs do not change; 1e-4: compiled code may reorder fp32 sums."""
    model, tokenizer, targets = load(deep_model_dir, four_bit=four_bit)
    batches = [causal_inputs(b) for b in make_batches(model, tokenizer, sample_path, width=width)]
    assert (len({b["input_ids"].shape[1] for b in batches}) == 1) == bool(width)
    budget = one_block_budget(model, targets, batches)
    eager, _ = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget, "exact")
    torch._dynamo.reset()
    counters.clear()
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled, stats = estimate_gradient_svd(model, targets, batches, 2 * RANK, budget, "exact", compile=True)
    assert len(stats.groups) == 4
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert all("forward" not in block.__dict__ for block in model.model.layers)
    for name in targets:
        torch.testing.assert_close(compiled[name].U * compiled[name].S @ compiled[name].V.T,
                                   eager[name].U * eager[name].S @ eager[name].V.T, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_cache_their_graphs_across_processes(tmp_path, monkeypatch):
    """Compiling sees AOTAutograd's disk cache open to autograd.Functions (our taps and adapters), only while a
    compiled block runs; compiling leaves the environment alone, and keep_compiled_graphs (the CLI's and the app's)
    puts torch's cache in our cache folder unless TORCHINDUCTOR_CACHE_DIR says otherwise."""
    seen = []

    def backend(graph, example_inputs):
        seen.append(torch._functorch.config.autograd_cache_allow_custom_autograd_functions)
        return graph.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    monkeypatch.setenv("FRUGAL_LORAGA_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset below; monkeypatch restores it")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    block = torch.nn.Linear(3, 2)
    compile_blocks([block])
    assert block(torch.ones(1, 4, 3)).shape == (1, 4, 2)
    assert seen == [True]
    assert not torch._functorch.config.autograd_cache_allow_custom_autograd_functions
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(tmp_path / "compiled")  # torch may set its own default
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    keep_compiled_graphs()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    keep_compiled_graphs()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    torch._dynamo.reset()


def test_compiled_blocks_compile_past_torchs_recompile_limit(monkeypatch):
    """A block forward's code holds more compiled kinds than torch's default recompile_limit (8) before torch would
    run it eagerly (the app trains run after run in one process, a few kinds each): ten shapes, each its own graph
    (automatic dynamic shapes off), all compiled. A higher limit set by the caller stays."""
    compiled_widths = []

    def backend(graph, example_inputs):
        compiled_widths.append(example_inputs[-1].shape[1])
        return graph.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # torch's default; restored after the test
    block = torch.nn.Linear(3, 2)
    compile_blocks([block])
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for width in range(1, 11):
            assert block(torch.ones(1, width, 3)).shape == (1, width, 2)
    uncompile_blocks([block])
    torch._dynamo.reset()
    assert compiled_widths == list(range(1, 11))
    torch._dynamo.config.recompile_limit = 1000
    compile_blocks([block])
    uncompile_blocks([block])
    assert torch._dynamo.config.recompile_limit == 1000


@pytest.mark.parametrize("any_width", [False, True])
def test_blocks_compiled_for_any_width_compile_once(tiny_model_dir, any_width, monkeypatch):
    """Batches of two widths through the compiled blocks: one graph when compiled for any width (training on examples
    of many lengths), two otherwise (the first width's, then one for any width); the same logits either way."""
    model, tokenizer, _ = load(tiny_model_dir, four_bit=False)
    ids = torch.randint(3, len(tokenizer), (2, 24), device=model.device)
    eager = [model(input_ids=ids[:, :width]).logits for width in (16, 24)]
    torch._dynamo.reset()
    counters.clear()
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    blocks, _ = block_layout(model, ["model.layers.0.mlp.up_proj"])
    compile_blocks(blocks, any_width=any_width)
    compiled = [model(input_ids=ids[:, :width]).logits for width in (16, 24)]
    uncompile_blocks(blocks)
    assert counters["stats"]["unique_graphs"] == (1 if any_width else 2), dict(counters["stats"])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_demo_model_estimate_matches_exact_svd(sample_path):
    """The real pretrained model (SmolLM2-135M-Instruct), fp32, default settings (randomized SVD), rank 8. Each
    block is run with grad once per batch (segments), not once per group."""
    model, tokenizer, targets = load("demo", four_bit=False, rank=8)
    batches = make_batches(model, tokenizer, sample_path, n_batches=2, size=2)
    grads = exact_gradients(model, targets, batches)
    blocks, _ = block_layout(model, list(targets))
    with grad_runs(blocks) as runs:
        svds, stats = estimate_gradient_svd(model, targets, batches, 16, budget_bytes=2**27)
    assert len(stats.groups) > 2 and stats.peak_state_bytes <= 2**27
    assert sum(runs) == len(blocks) * len(batches)
    assert_faithful(svds, grads, 16)


def test_fidelity_measures_on_known_bases():
    G = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    eye = torch.eye(4)
    assert captured_energy(G, eye[:, :2], eye[:, :2]) == pytest.approx(1.0)
    assert captured_energy(G, eye[:, 1:3], eye[:, 1:3]) == pytest.approx((9 + 4) / (16 + 9))
    assert subspace_agreement(eye[:, :2], eye[:, :2]) == pytest.approx(1.0)
    assert subspace_agreement(eye[:, :2], eye[:, 1:3]) == pytest.approx(0.5)
    assert subspace_agreement(eye[:, :2], eye[:, 2:]) == pytest.approx(0.0)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_progress_callback_that_raises_leaves_the_model_as_it_was(tiny_model_dir, sample_path, compiled):
    """A stop (the app's) raises from the progress callback, first called before any batch: the model keeps its own
    layers and eager forwards, with no tap left in it (a compiled forward left on a block holds the model alive)."""
    model, tokenizer, targets = load(tiny_model_dir, four_bit=False)
    batches = make_batches(model, tokenizer, sample_path, n_batches=2)

    def stop(*args):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        estimate_gradient_svd(model, targets, batches, 2 * RANK, 2**30, progress=stop,
                              compile=compiled and torch.cuda.is_available())
    assert all(model.get_submodule(name) is module for name, module in targets.items())
    assert not any("forward" in block.__dict__ for block in model.model.layers)
