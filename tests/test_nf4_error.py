"""The 4-bit error's correction: the closed form against a direct reference, the corrected model nearer the original,
step 0 exact on the corrected model, both exports through PEFT, resume, layers with nothing to correct, and reading the
original weights."""
import json
import logging
import threading
import weakref
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from frugal_loraga import Config, ConfigError, finetune, nf4_error
from frugal_loraga.blocks import block_layout
from frugal_loraga.checkpoint import adapter_for, checkpoint_path, factors_from_checkpoint
from frugal_loraga.data import collate, load_examples
from frugal_loraga.estimate.inputs import hidden_of, identical, with_hidden
from frugal_loraga.init import estimation_batches, initial_corrections, initial_factors
from frugal_loraga.lora import FrozenLinear, features, find_targets, inject, replace
from frugal_loraga.models import load_model, resolve_device
from frugal_loraga.nf4_error import (RIDGE, OriginalWeights, ReadAhead, _block_inputs, _groups, _weightings,
                                    best_correction, layer_bytes, nf4_corrections, whitening)
from conftest import SAMPLE
from test_families import ADAPTED, save_tiny


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def reference_correction(error, X, rank):
    """The same optimum by another route: whitening by the symmetric square root of H (not its Cholesky factor), a
    full SVD, and the pseudo-inverse: the product L R is the same, whichever factor of H whitens."""
    H = X.T @ X
    H = H + RIDGE * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    values, vectors = torch.linalg.eigh(H)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    U, S, Vh = torch.linalg.svd(error @ root)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank] @ torch.linalg.inv(root)


@pytest.mark.parametrize("m,n,rank", [(48, 40, 3), (37, 64, 8), (64, 29, 5)])
def test_best_correction_is_the_activation_weighted_optimum(m, n, rank):
    generator = torch.Generator().manual_seed(m + n)
    error = torch.randn(m, n, generator=generator, dtype=torch.float64)
    X = torch.randn(300, n, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    L, R = best_correction(error.float(), whitening((X.T @ X).float()), rank, "exact")
    assert L.shape == (m, rank) and R.shape == (rank, n)
    expected = reference_correction(error, X, rank)
    torch.testing.assert_close((L @ R).double(), expected, rtol=1e-3, atol=1e-3)

    def left_on_the_data(M):
        return ((error - M) @ X.T).norm() / (error @ X.T).norm()
    U, S, Vh = torch.linalg.svd(error)
    plain = (U[:, :rank] * S[:rank]) @ Vh[:rank]  # the best rank-r fit of the error itself
    assert left_on_the_data(expected) < left_on_the_data(plain)
    L, R = best_correction(error.float(), whitening((X.T @ X).float()), rank, "lowrank")  # randomized: near the optimum
    assert left_on_the_data((L @ R).double()) < left_on_the_data(expected) + 0.01


def test_the_diagonal_weighting_is_its_own_optimum():
    """With diag(X^T X) for X^T X: the best rank-r fit of E scaled by the input sizes, scaled back."""
    generator = torch.Generator().manual_seed(0)
    error, X = torch.randn(30, 20, generator=generator), torch.randn(100, 20, generator=generator) * torch.arange(1, 21)
    L, R = best_correction(error, whitening((X.T @ X).diagonal().clone()), 4, "exact")
    moments = (X.T @ X).diagonal()
    scale = (moments + RIDGE * moments.mean()).sqrt()
    U, S, Vh = torch.linalg.svd(error * scale)
    torch.testing.assert_close(L @ R, (U[:, :4] * S[:4]) @ Vh[:4] / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("n", [5, 12, 29])
def test_block_triangular_products_match_full_ones(n, dtype, tolerance, monkeypatch):
    """add_gram against X^T X on and above the diagonal (twice, into a sum), its blocks below left as they were;
    times_lower against E C: block sizes that do not divide n, 16-bit inputs summed in fp32 (on a GPU by cuBLAS
    into the sum's blocks in place)."""
    monkeypatch.setattr(nf4_error, "BLOCK", 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(n)
    X = torch.randn(37, n, generator=generator).to(device, dtype)
    gram = torch.full((n, n), 7.0, device=device)
    before = gram.clone()
    nf4_error.add_gram(gram, X)
    nf4_error.add_gram(gram, X)
    expected = before + 2 * X.float().T @ X.float()
    blocks = torch.block_diag(*[torch.ones(4, 4)] * (n // 4 + 1))[:n, :n]
    on_or_above = (blocks + torch.ones(n, n).triu()).bool().to(device)
    torch.testing.assert_close(gram[on_or_above], expected[on_or_above], rtol=tolerance, atol=tolerance * n)
    assert torch.equal(gram[~on_or_above], before[~on_or_above])
    E, C = torch.randn(6, n, generator=generator), torch.randn(n, n, generator=generator).tril()
    torch.testing.assert_close(nf4_error.times_lower(E.to(device), C.to(device)).cpu(), E @ C, rtol=1e-4, atol=1e-4)


def test_whitening_reads_only_the_upper_triangle(monkeypatch):
    """add_gram's sum (nothing below its diagonal blocks) gives the factor of the whole X^T X: the factorization reads
    the upper triangle alone, which torch does not document."""
    monkeypatch.setattr(nf4_error, "BLOCK", 4)
    X = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    gram = torch.zeros(10, 10)
    nf4_error.add_gram(gram, X)
    assert not gram.tril(-4).any()
    torch.testing.assert_close(whitening(gram), whitening(X.T @ X), rtol=1e-5, atol=1e-5)


def test_a_layer_narrower_than_the_rank_gets_zeros_for_the_rest():
    X = torch.randn(50, 6)
    L, R = best_correction(torch.randn(4, 6), whitening(X.T @ X), rank=8)
    assert L.shape == (4, 8) and R.shape == (8, 6)
    assert not L[:, 4:].any() and not R[4:].any()


def four_bit_setup(folder, sample_path, rank=4, **settings):
    config = Config(model=str(folder), data=str(sample_path), rank=rank, estimation_samples=8, dtype="float32",
                    progress=False, **settings)
    model, tokenizer, device = load_model(config)
    examples, _ = load_examples(sample_path, "auto", tokenizer, 96)
    targets = find_targets(model, config.target_list(), config.rank, config.init)
    return config, model, tokenizer, device, examples, targets


@pytest.mark.parametrize("full", [True, False])
def test_the_corrected_4bit_model_is_nearer_the_original(deep_model_dir, sample_path, caplog, full):
    """Corrections made a decoder layer at a time bring the 4-bit model's logits on held-out examples nearer the
    original model's; with a budget too small for any X^T X, each layer is weighted by its input sizes (named in a
    warning), which recovers less. The model is left as it was found."""
    config, model, tokenizer, device, examples, targets = four_bit_setup(deep_model_dir, sample_path)
    original, _, _ = load_model(Config(model=str(deep_model_dir), data="unused", load_in_4bit=False, dtype="float32"))
    batch = collate(examples[-6:], tokenizer.pad_token_id, device)
    reference, four_bit = logits(original, batch), logits(model, batch)
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device, masked=True)
    block = [layer_bytes(*features(m), True) for n, m in targets.items() if ".layers.0." in n]
    budget = sum(held for held, _ in block) + max(extra for _, extra in block) if full else 1  # a decoder layer's
    seen = []
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        corrections = nf4_corrections(model, targets, batches, 16, budget, OriginalWeights(deep_model_dir),
                                      lambda done, total: seen.append((done, total)))
    sizes = [7] * 4 if full else [1] * len(targets)  # a group a decoder layer (its 7 targets), or a layer
    expected, done = [0], 0
    for size in sizes:  # the group's forwards count a unit per layer, then each layer's SVD one
        expected += [done + size + k for k in range(size + 1)]
        done += 2 * size
    assert seen == [(d, 2 * len(targets)) for d in expected]
    assert ("weighted by input sizes only" in caplog.text) != full
    assert set(corrections) == set(targets)
    assert all(dict(model.named_modules())[n] is m for n, m in targets.items())
    assert torch.equal(logits(model, batch), four_bit)
    replace(model, {n: FrozenLinear(m, corrections[n]) for n, m in targets.items()})
    corrected = logits(model, batch)
    before, after = (four_bit - reference).square().mean(), (corrected - reference).square().mean()
    assert after < (0.7 if full else 0.9) * before, (before, after)  # 0.52, 0.8x here: random weights, 8 examples


def test_step0_is_the_corrected_model_exactly(tiny_model_dir, sample_path):
    """Tolerance: none. With the correction in place the LoRA-GA adapters still cancel bit for bit."""
    config, model, tokenizer, device, examples, targets = four_bit_setup(tiny_model_dir, sample_path)
    batch = collate(examples[:3], tokenizer.pad_token_id, device)
    corrections, metrics = initial_corrections(model, targets, examples, config, str(tiny_model_dir),
                                               tokenizer.pad_token_id, device)
    assert metrics["corrected_layers"] == len(targets) == len(corrections)
    assert all(R.shape == (config.nf4_error_rank, targets[n].in_features) for n, (L, R) in corrections.items())
    replace(model, {n: FrozenLinear(m, corrections[n]) for n, m in targets.items()})
    corrected = logits(model, batch)
    replace(model, targets)
    factors, _ = initial_factors(model, targets, examples, config, tokenizer.pad_token_id, device, None,
                                 corrections=corrections)
    inject(model, factors, config.eta, corrections)
    assert torch.equal(logits(model, batch), corrected)


def test_no_correction_without_4bit_or_with_rank_0(tiny_model_dir, sample_path):
    for settings in (dict(load_in_4bit=False), dict(nf4_error_rank=0)):
        config, model, tokenizer, device, examples, targets = four_bit_setup(tiny_model_dir, sample_path, **settings)
        assert initial_corrections(model, targets, examples, config, str(tiny_model_dir), tokenizer.pad_token_id,
                                   device) == ({}, {})
    with pytest.raises(ConfigError, match="nf4_error_rank must be a finite number >= 0, got -1"):
        Config(data="x", nf4_error_rank=-1)


@pytest.mark.parametrize("init,use_rslora", [("lora_ga", True), ("lora", True), ("lora_ga", False)])
def test_both_exports_reproduce_our_logits_in_peft(tiny_model_dir, sample_path, tmp_path, init, use_rslora):
    """adapter_nf4 on the 4-bit base gives our trained model (correction included); adapter on the original base
    gives our adapters on the original weights (the correction stands in for them, so it is left out). A resume
    takes the corrections from the checkpoint."""
    config = Config(model=str(tiny_model_dir), data=str(sample_path), init=init, rank=4, dtype="float32", steps=4,
                    lr=5e-3, estimation_samples=8, eval_every=0, out=str(tmp_path / "run"), progress=False,
                    use_rslora=use_rslora)
    result = finetune(config)
    assert result.metrics["corrected_layers"] > 0
    assert adapter_for(config.out, True) == tmp_path / "run" / "adapter_nf4"
    assert adapter_for(config.out, False) == result.adapter_dir
    saved = torch.load(checkpoint_path(config.out), weights_only=True)["adapter"]
    factors, corrections = factors_from_checkpoint(saved, resolve_device(config))  # the device the model loads on
    assert set(corrections) == set(factors)

    model, tokenizer, device = load_model(config)
    examples, _ = load_examples(sample_path, "auto", tokenizer, 96)
    batch = collate(examples[:3], tokenizer.pad_token_id, device)
    inject(model, factors, config.eta, corrections)
    ours = logits(model, batch)
    base, _, _ = load_model(config)
    peft_model = PeftModel.from_pretrained(base, adapter_for(config.out, True))
    assert peft_model.peft_config["default"].r == (2 * 4 if init == "lora_ga" else 4) + config.nf4_error_rank
    torch.testing.assert_close(logits(peft_model, batch), ours, rtol=1e-4, atol=1e-4)

    original = Config(model=str(tiny_model_dir), data="unused", load_in_4bit=False, dtype="float32")
    model, _, _ = load_model(original)
    inject(model, factors, config.eta)
    base, _, _ = load_model(original)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, result.adapter_dir), batch),
                               logits(model, batch), rtol=1e-4, atol=1e-4)


def test_a_resumed_run_keeps_its_corrections(tiny_model_dir, sample_path, tmp_path):
    """Stopped after 2 of 4 steps, resumed: the corrections come from the checkpoint (not made again), and the
    resumed run's adapter_nf4 equals an uninterrupted run's."""
    settings = dict(model=str(tiny_model_dir), data=str(sample_path), rank=4, dtype="float32", steps=4, lr=5e-3,
                    estimation_samples=8, eval_every=0, save_every=2, progress=False)
    straight = finetune(Config(**settings, out=str(tmp_path / "straight")))
    stop = threading.Event()
    config = Config(**settings, out=str(tmp_path / "run"))
    finetune(config, progress=lambda phase, done, total, m: stop.set() if phase == "training" and done == 2 else None,
             stop=stop)
    before = factors_from_checkpoint(torch.load(checkpoint_path(config.out), weights_only=True)["adapter"],
                                     torch.device("cpu"))[1]
    resumed = finetune(Config(**{**config.to_dict(), "resume": True}))
    after = factors_from_checkpoint(torch.load(checkpoint_path(config.out), weights_only=True)["adapter"],
                                    torch.device("cpu"))[1]
    assert "correction_seconds" in resumed.metrics and set(before) == set(after)
    assert all(torch.equal(after[n][i], before[n][i]) for n in before for i in (0, 1))
    ours, theirs = (load_file(Path(out) / "adapter_nf4" / "adapter_model.safetensors")
                    for out in (config.out, straight.adapter_dir.parent))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_layers_with_nothing_to_correct_and_routed_experts(tmp_path, sample_path, caplog):
    """Falcon's layers stay in 16 bits under 4-bit loading: nothing to correct, said, and the run goes on. Qwen2-MoE's
    shared expert sees its tokens flattened (tokens x hidden): it is corrected too."""
    from test_families import save_tiny
    for family, corrected in (("falcon", False), ("qwen2_moe", True)):
        folder = tmp_path / family
        save_tiny(folder, family)
        config, model, tokenizer, device, examples, targets = four_bit_setup(folder, sample_path, rank=2)
        with caplog.at_level(logging.WARNING, "frugal_loraga"):
            corrections, _ = initial_corrections(model, targets, examples, config, str(folder),
                                                 tokenizer.pad_token_id, device)
        assert bool(corrections) == corrected
        if corrected:
            assert any("shared_expert." in n for n in corrections)
        else:
            assert "is not corrected (not 4-bit" in caplog.text


def test_non_finite_inputs_leave_the_layer_uncorrected(caplog):
    X = torch.randn(50, 8)
    gram = X.T @ X
    gram[1, 2] = float("nan")
    with caplog.at_level(logging.WARNING, "frugal_loraga"):
        L, R = best_correction(torch.randn(6, 8), whitening(gram), 3)
    assert not L.any() and not R.any() and L.shape == (6, 3) and R.shape == (3, 8)
    assert "left uncorrected" in caplog.text


def test_original_weights_are_read_by_name_from_sharded_or_prefixless_files(tmp_path):
    """An index names each tensor's shard; a file saved without the model's first name part (GPT-2's) and a
    weight stored transposed (Conv1D's in x out) are found too; an absent one is None. Read ahead, they come in the
    order asked."""
    first, second = torch.randn(3, 5), torch.randn(4, 3)
    save_file({"model.layers.0.q.weight": first}, tmp_path / "a.safetensors")
    save_file({"h.0.c_attn.weight": second.T.contiguous()}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.q.weight": "a.safetensors", "h.0.c_attn.weight": "b.safetensors"}}))
    weights = OriginalWeights.of(str(tmp_path))
    assert torch.equal(weights.weight("model.layers.0.q", (3, 5)), first)
    assert torch.equal(weights.weight("transformer.h.0.c_attn", (4, 3)), second)
    assert weights.weight("model.layers.0.k", (3, 5)) is None
    assert OriginalWeights.of(str(tmp_path / "nowhere")) is None
    shapes = {"model.layers.0.q": (3, 5), "transformer.h.0.c_attn": (4, 3)}
    read_ahead = ReadAhead(weights, list(shapes) * 2, shapes, torch.device("cpu"))
    for expected in (first, second, first):
        assert torch.equal(next(read_ahead), expected)
    read_ahead.close()


def test_read_ahead_reads_one_weight_ahead_and_raises_a_failed_read_where_it_is_taken():
    """ReadAhead asks for the next weight as it hands one out, no further; a read that failed raises at the next()
    for that weight, not before; close() ends the thread and lets go of the pending read."""
    asked = []

    class Weights:
        def weight(self, name, shape):
            asked.append(name)
            if name == "bad":
                raise OSError("unreadable")
            return torch.full(shape, float(len(asked)))

    names = ["a", "b", "bad", "c"]
    read_ahead = ReadAhead(Weights(), names, dict.fromkeys(names, (2, 2)), torch.device("cpu"))
    assert torch.equal(next(read_ahead), torch.full((2, 2), 1.0))
    read_ahead.pending.result()
    assert asked == ["a", "b"]
    assert torch.equal(next(read_ahead), torch.full((2, 2), 2.0))
    with pytest.raises(OSError, match="unreadable"):
        next(read_ahead)
    read_ahead.close()
    assert read_ahead.pending is None
    assert not [t for t in threading.enumerate() if t.name.startswith("frugal-loraga-read")]


@pytest.mark.parametrize("k_full", [True, False])
def test_layers_called_on_one_input_share_one_sum_equal_to_each_ones_own(tiny_model_dir, sample_path, k_full,
                                                                         monkeypatch):
    """q, k and v are called on one tensor, as are gate and up: _weightings sums its X^T X once, the same tensor under
    each name, equal (in its upper triangle, summed in blocks of 40 columns here) to the sum each layer's own inputs
    give (pads left out). A layer weighted by its diagonal (k_full False) shares with no full one: k gets its own
    diagonal and v starts a sum of its own."""
    monkeypatch.setattr(nf4_error, "BLOCK", 40)
    config, model, tokenizer, device, examples, targets = four_bit_setup(tiny_model_dir, sample_path)
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device, masked=True)
    layers = {n: t for n, t in targets.items() if ".layers.0." in n}
    short = {n: n.rsplit(".", 1)[1] for n in layers}
    full = {n: k_full or short[n] != "k_proj" for n in layers}
    blocks, _ = block_layout(model, list(layers))
    model.eval()
    with torch.no_grad():
        kept = _block_inputs(model, blocks, batches)
        seen = {n: [] for n in layers}
        handles = [layer.register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0]))
                   for n, layer in layers.items()]
        hidden = [kept.kept_hidden(0, b, "cpu") for b in range(len(batches))]
        sums = _weightings(blocks, kept, hidden, 0, 0, layers, full, batches)
    for handle in handles:
        handle.remove()
    by = {short[n]: sums[n] for n in layers}
    assert by["gate_proj"] is by["up_proj"]
    assert by["o_proj"] is not by["q_proj"] and by["down_proj"] is not by["up_proj"]
    if k_full:
        assert by["q_proj"] is by["k_proj"] is by["v_proj"]
    else:
        assert by["k_proj"].dim() == 1 and by["v_proj"] is not by["q_proj"]
    for name in layers:
        X = torch.cat([x.reshape(-1, x.shape[-1])[batch["attention_mask"].flatten().bool()].double()
                       for x, batch in zip(seen[name], batches, strict=True)])
        expected = (X.T @ X).triu() if full[name] else X.square().sum(0)
        summed = sums[name].triu() if full[name] else sums[name]
        assert X.shape[1] > 40 and X.shape[1] % 40
        torch.testing.assert_close(summed.double(), expected, rtol=1e-4, atol=1e-3)


class Scripted(nn.Module):
    """A block calling its layers a and b as each batch's script says: (layer, input), input 0 the hidden state, 1
    another tensor, 2 a copy of the hidden state (the same values, another tensor); ("double", i) doubles input i in
    place."""

    def __init__(self, scripts):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.scripts = iter(scripts)

    def forward(self, hidden):
        inputs = (hidden, hidden * 2, hidden.clone())
        out = torch.zeros(())
        for layer, i in next(self.scripts):
            if layer == "double":
                inputs[i].mul_(2)
            else:
                out = out + getattr(self, layer)(inputs[i])
        return out


class Given:
    """What _weightings asks of KeptInputs: each block's call for a batch, with no inputs besides the hidden state."""

    def inputs(self, batch, start, stop, device, copies):
        return [((None,), {})] * (stop - start)


SHARED, OWN = "b's sum is a's", "b's sum is its own"


@pytest.mark.parametrize("scripts,outcome", [
    ([[("a", 0), ("b", 0)]] * 2, SHARED),
    ([[("a", 0), ("b", 0), ("a", 1), ("b", 1)]] * 2, SHARED),  # called twice a batch, on one input each time
    ([[("a", 0), ("b", 1)], [("a", 0), ("b", 0)]], OWN),  # settled on b's first call: its own from then on
    ([[("a", 0), ("b", 2)]] * 2, OWN),  # the same values in another tensor: not shared
    ([[("a", 2), ("double", 2), ("b", 2)]] * 2, OWN),  # the same tensor, changed in place between the calls
    ([[("a", 0), ("a", 1), ("b", 1)]] * 2, OWN),  # a's sum already holds input 0 when b first comes
    ([[("a", 0)], [("a", 0), ("b", 0)]], OWN),  # a's sum already holds the first batch
    ([[("a", 0), ("b", 0)], [("a", 0), ("b", 2)]], "called on a's input on an earlier batch but not now"),
    ([[("a", 0), ("b", 0), ("a", 1)]] * 2, r"shares a's input but was called 1 time\(s\) in a batch to its 2"),
])
def test_a_layer_shares_a_sum_only_where_every_call_repeats_its_first(scripts, outcome):
    """Whatever the order of calls, each sum is what the layer's own inputs give, or the run stops with a message."""
    torch.manual_seed(0)
    block = Scripted(scripts)
    batches = [{"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)}] * len(scripts)
    hidden = [torch.randn(1, 3, 4) for _ in batches]
    layers, full = {"a": block.a, "b": block.b}, {"a": True, "b": True}
    given = {name: [] for name in layers}  # what each call was given, as it was at the call
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, name=name: given[name].append(args[0].clone()))
    with torch.no_grad():
        if outcome not in (SHARED, OWN):
            with pytest.raises(RuntimeError, match=outcome):
                _weightings([block], Given(), hidden, 0, 0, layers, full, batches)
            return
        sums = _weightings([block], Given(), hidden, 0, 0, layers, full, batches)
    assert (sums["a"] is sums["b"]) == (outcome == SHARED)
    for name in layers:
        X = torch.cat([x.reshape(-1, 4) for x in given[name]])
        torch.testing.assert_close(sums[name].triu(), (X.T @ X).triu(), rtol=1e-5, atol=1e-5)


def test_inference_tensors_are_never_shared():
    """They keep no count of in-place changes: an input changed between two calls could not be told apart."""
    block = Scripted([[("a", 0), ("b", 0)]])
    batches = [{"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)}]
    with torch.inference_mode():
        sums = _weightings([block], Given(), [torch.randn(1, 3, 4)], 0, 0, {"a": block.a, "b": block.b},
                           {"a": True, "b": True}, batches)
    assert sums["a"] is not sums["b"]
    torch.testing.assert_close(sums["a"], sums["b"])


def test_each_sum_and_factor_is_let_go_after_its_last_layer(deep_model_dir, sample_path, monkeypatch):
    """Within a group a Cholesky factor lives until the last layer that shares it is corrected, and no sum of a group
    is held when the next group's forwards begin (a budget of about one decoder layer: several groups)."""
    config, model, tokenizer, device, examples, targets = four_bit_setup(deep_model_dir, sample_path,
                                                                         grad_budget_gib=1.5e-4)
    sums_before, factors_before, groups = [], [], []
    weightings, correction = nf4_error._weightings, nf4_error._correction

    def tracked_weightings(*args):
        assert all(sum_() is None for sum_ in sums_before)
        groups.append(args[5])
        sums = weightings(*args)
        sums_before.extend(weakref.ref(s) for s in set(sums.values()))
        return sums

    def tracked_correction(layer, original, C, rank, svd):
        assert all(factor() is None or factor() is C for factor in factors_before)
        factors_before.append(weakref.ref(C))
        return correction(layer, original, C, rank, svd)
    monkeypatch.setattr(nf4_error, "_weightings", tracked_weightings)
    monkeypatch.setattr(nf4_error, "_correction", tracked_correction)
    corrections, _ = initial_corrections(model, targets, examples, config, str(deep_model_dir),
                                         tokenizer.pad_token_id, device)
    assert len(corrections) == 7 * len(model.model.layers)
    assert len(groups) > 1 and len(sums_before) < len(corrections)  # several groups, and sums shared within them
    assert all(s() is None for s in sums_before + factors_before)


def test_groups_are_whole_decoder_layers_where_one_fits():
    """A group ends at a decoder layer's end unless a whole one does not fit alone: then that one is split a layer at
    a time (its layers grouped as many as fit), and the next group may start inside it."""
    index = {f"{block}.{layer}": block for block in range(4) for layer in "abc"}
    costs = {name: (4 if block == 2 else 1, 1) for name, block in index.items()}  # block 2 holds 12 + 1
    whole = [[f"{block}.{layer}" for layer in "abc"] for block in range(4)]
    assert _groups(list(index), costs, 7, index) == [whole[0] + whole[1], ["2.a"], ["2.b"], ["2.c"], whole[3]]
    assert _groups(list(index), costs, 8, index) == [whole[0] + whole[1], ["2.a"], ["2.b"], ["2.c"] + whole[3]]
    assert _groups(list(index), costs, 9, index) == [whole[0] + whole[1], ["2.a", "2.b"], ["2.c"] + whole[3]]


def test_layers_that_share_a_sum_share_one_cholesky_factor(tiny_model_dir, sample_path, monkeypatch):
    """whitening factors each distinct sum once: 4 of a Llama decoder layer's 7 targets (q, k, v on one input; o;
    gate, up on one; down)."""
    config, model, tokenizer, device, examples, targets = four_bit_setup(tiny_model_dir, sample_path)
    factored = []
    monkeypatch.setattr(nf4_error, "whitening", lambda weighting: factored.append(weighting) or whitening(weighting))
    corrections = initial_corrections(model, targets, examples, config, str(tiny_model_dir), tokenizer.pad_token_id,
                                      device)[0]
    layers = len(model.model.layers)
    assert len(corrections) == 7 * layers and len(factored) == 4 * layers
    assert len({id(weighting) for weighting in factored}) == len(factored)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the page-locked staging runs for a CUDA device only")
def test_read_ahead_hands_out_each_weight_on_the_gpu_as_saved(tmp_path):
    """On a CUDA device the weights pass through HostTransfers' two page-locked buffers (sized for the largest): each
    arrives on the GPU in its saved dtype and values, in order, a smaller one after a larger (a buffer's reuse), a
    weight saved transposed contiguous, and an fp32 one of the largest shape (twice a buffer) copied the plain way."""
    saved = {"model.layers.0.q.weight": torch.randn(64, 48, dtype=torch.bfloat16),
             "model.layers.0.k.weight": torch.randn(16, 48, dtype=torch.bfloat16),
             "h.0.c_attn.weight": torch.randn(48, 32, dtype=torch.bfloat16),
             "model.layers.0.v.weight": torch.randn(64, 48)}
    save_file(saved, tmp_path / "model.safetensors")
    shapes = {"model.layers.0.q": (64, 48), "model.layers.0.k": (16, 48), "transformer.h.0.c_attn": (32, 48),
              "model.layers.0.v": (64, 48)}
    expected = [saved["model.layers.0.q.weight"], saved["model.layers.0.k.weight"], saved["h.0.c_attn.weight"].T,
                saved["model.layers.0.v.weight"]]
    read_ahead = ReadAhead(OriginalWeights.of(str(tmp_path)), list(shapes) * 2, shapes, torch.device("cuda"))
    for want in expected * 2:
        got = next(read_ahead)
        assert got.is_cuda and got.dtype == want.dtype and got.is_contiguous()
        assert torch.equal(got.cpu(), want)
    read_ahead.close()
    assert read_ahead.pending is None


@pytest.mark.parametrize("several_widths", [True, False])
def test_the_correction_runs_without_cudnn_attention_on_several_widths(tiny_model_dir, tmp_path, several_widths):
    """As the estimate and training do (blocks.attention_for): cuDNN's attention would plan anew for each width."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "the cat sat " * (1 + several_widths * (i % 5))}) + "\n"
                            for i in range(8)))
    config, model, tokenizer, device, examples, targets = four_bit_setup(tiny_model_dir, data)
    allowed = []
    handles = [layer.register_forward_pre_hook(lambda *_: allowed.append(torch.backends.cuda.cudnn_sdp_enabled()))
               for layer in model.model.layers]
    initial_corrections(model, targets, examples, config, str(tiny_model_dir), tokenizer.pad_token_id, device)
    for handle in handles:
        handle.remove()
    assert allowed and set(allowed) == {not several_widths}
    assert torch.backends.cuda.cudnn_sdp_enabled()


def full_forward_inputs(model, blocks, batches):
    """What each block is given (args, kwargs) in a forward of the base model through every block, per batch."""
    given = [[None] * len(blocks) for _ in batches]
    for b, batch in enumerate(batches):
        handles = [block.register_forward_pre_hook(
            lambda m, args, kwargs, j=j: given[b].__setitem__(j, (args, kwargs)), with_kwargs=True)
            for j, block in enumerate(blocks)]
        model.base_model(input_ids=batch["input_ids"])
        for handle in handles:
            handle.remove()
    return given


def assert_kept_as_given(kept, given):
    for b in range(len(given)):
        assert identical(kept.hidden[0][b], hidden_of(*given[b][0]))
        for j in range(len(given[b])):
            assert identical(kept.others[b][j], with_hidden(*given[b][j], None)), f"batch {b}, block {j}"


@pytest.mark.parametrize("model_type", list(ADAPTED))
def test_each_blocks_inputs_are_those_of_a_full_forward(model_type, tmp_path, caplog):
    """The calibration's first pass runs block 0 alone after the first batch (the blocks above return its output):
    what each block is given besides the hidden state, and block 0's hidden state, must be what a forward through
    every block gives it. In every family the layer loop makes those inputs, so the first batch's check passes and
    the shortcut is taken. Four layers: block 2 is the first whose inputs could depend on a skipped block."""
    folder = save_tiny(tmp_path / model_type, model_type, layers=4)
    config = Config(model=str(folder), data=str(SAMPLE), load_in_4bit=False, dtype="float32", estimation_samples=6)
    model, tokenizer, device = load_model(config)
    examples, _ = load_examples(SAMPLE, "auto", tokenizer, 96)
    batches = estimation_batches(examples, config, tokenizer.pad_token_id, device, masked=True)
    assert len(batches) >= 2
    blocks, _ = block_layout(model, list(find_targets(model, config.target_list(), config.rank, config.init)))
    model.eval()
    with torch.no_grad(), caplog.at_level(logging.INFO, "frugal_loraga"):
        given = full_forward_inputs(model, blocks, batches)
        kept = _block_inputs(model, blocks, batches)
    assert "depend on the blocks below" not in caplog.text
    assert_kept_as_given(kept, given)
    assert all("forward" not in block.__dict__ for block in blocks)  # the blocks' own forwards back


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden, below):
        return self.linear(hidden) + below


class Chained(nn.Module):
    """A decoder whose layer loop gives each block something the block below computed (its output's mean)."""

    def __init__(self, layers: int = 4, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))

    @property
    def base_model(self):
        return self

    def forward(self, input_ids):
        hidden, below = self.embed(input_ids), torch.zeros(())
        for layer in self.layers:
            hidden = layer(hidden, below=below)
            below = hidden.mean()
        return hidden


def test_blocks_given_what_the_blocks_below_computed_get_full_forwards(caplog):
    """Where the first batch shows a block's inputs depend on the blocks below, every batch runs every block: the
    kept inputs are still those of full forwards."""
    torch.manual_seed(0)
    model = Chained()
    blocks = list(model.layers)
    batches = [{"input_ids": torch.randint(0, 50, (2, 5))} for _ in range(3)]
    with torch.no_grad(), caplog.at_level(logging.INFO, "frugal_loraga"):
        given = full_forward_inputs(model, blocks, batches)
        kept = _block_inputs(model, blocks, batches)
    assert "depend on the blocks below" in caplog.text
    assert_kept_as_given(kept, given)
