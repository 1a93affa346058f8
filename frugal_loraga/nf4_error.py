"""The 4-bit base's quantization error that the data sees, absorbed by a frozen low-rank correction (as CLoQ does).

For a target layer with original weight W (m x n, read from the model's safetensors files) and 4-bit weight Q (the
loaded NF4 weight, dequantized), E = W - Q. Over the calibration tokens X (N x n) that reach the layer, with
H = X^T X + lambda I = C C^T (Cholesky, lambda = RIDGE x mean of diag(X^T X)), the rank-q correction L R closest to E
on those inputs,
    min over rank-q L R of  ||(E - L R) X^T||_F  ~  ||(E - L R) C||_F,
is the top-q SVD of E C = U S V^T:  L = U S (m x q),  R = V^T C^-1 (q x n).
Where H (n x n, fp32) does not fit the memory budget, its diagonal stands in for it (C = diag(H)^(1/2): each input
channel weighted by its size, as AWQ does), which recovers less of the error but holds n numbers, not n^2.
The layer then computes Q x + L (R x) (lora.FrozenLinear). The base stays the untouched NF4 weight; the LoRA-GA
gradient is then estimated at the corrected model, whose output is closer to the original model's than the 4-bit
model's is.
The layers are calibrated from the bottom up, a group at a time within the budget: a group's H come from no-grad runs
of its decoder layers (blocks) from the hidden state entering them, carried up with the corrections of the groups
below in place (within a group, the layers see the uncorrected model; on the tiny test model this ordering changed
the remaining error by a few percent only, so groups are as large as the budget allows, in whole decoder layers
where one fits).
"""
from __future__ import annotations

import itertools
import json
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .blocks import attention_for, block_layout
from .distributed import from_rank0_
from .estimate.inputs import KeptInputs, identical, moved, run_blocks
from .estimate.tap import accumulate_outer
from .experts import ExpertParameter
from .lora import Correction, FrozenLinear, features, replace
from .nf4 import FourBitWeight
from .svd import top_singular
from .transfers import HostTransfers

log = logging.getLogger("frugal_loraga")
RIDGE = 1e-2


class OriginalWeights:
    """The weights of a model's safetensors files, read one tensor at a time (never the whole model in memory)."""

    def __init__(self, folder: Path):
        self.files: dict[str, Path] = {}
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.files = {key: folder / file for key, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))

    @classmethod
    def of(cls, model_path: str) -> Optional["OriginalWeights"]:
        """For a model folder or a hub id in the local cache; None where no safetensors files are found."""
        folder = Path(model_path)
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download
                folder = Path(snapshot_download(model_path, local_files_only=True))
            except Exception:  # not cached as files we can read: no correction
                return None
        weights = cls(folder)
        return weights if weights.files else None

    def has(self, name: str, shape: tuple[int, int]) -> bool:
        """Whether the weight of `name` is saved, by its key and shape (read from the file's header, not its data)."""
        for key in self._keys(name):
            if key in self.files:
                with safe_open(str(self.files[key]), "pt") as f:
                    saved = tuple(f.get_slice(key).get_shape())
                return saved in (shape, shape[::-1])
        return False

    @staticmethod
    def _keys(name: str) -> tuple[str, str]:
        return f"{name}.weight", f"{name.partition('.')[2]}.weight"

    def weight(self, name: str, shape: tuple[int, int]) -> Optional[torch.Tensor]:
        """The weight (m x n) of the module `name` as saved ('model.layers.0.mlp.up_proj.weight', or without the
        first part of the name, as GPT-2's files are), transposed where saved as (n x m) (Conv1D); None if absent."""
        for key in self._keys(name):
            if key in self.files:
                with safe_open(str(self.files[key]), "pt") as f:
                    tensor = f.get_tensor(key)
                if tuple(tensor.shape) == shape:
                    return tensor
                if tuple(tensor.shape) == shape[::-1]:
                    return tensor.T
        return None


def whitening(weighting: torch.Tensor) -> Optional[torch.Tensor]:
    """The C that weights a layer's error (module docstring), from weighting = X^T X (n x n, fp32, of which only the
    upper triangle is read: add_gram's; overwritten by C, lower triangular, H = C C^T) or its diagonal (n; C is its
    square root, as a vector), the ridge added; None where the inputs gave no usable weighting (non-finite
    activations, H not positive definite). Layers fed the same inputs share it."""
    if not bool(torch.isfinite(weighting).all()):
        return None
    diagonal = weighting if weighting.dim() == 1 else weighting.diagonal()
    diagonal.add_(RIDGE * diagonal.mean().clamp_min(1e-12))
    if weighting.dim() == 1:
        return weighting.sqrt_()
    # in place, on the transpose (the column-major layout the factorization writes): the factorization (LAPACK's,
    # cuSOLVER's or MAGMA's potrf, lower) reads only the lower triangle of weighting.mT, the upper of weighting, the
    # one add_gram sums (torch does not document which triangle it reads: test_whitening_reads_only_the_upper_triangle)
    info = torch.empty((), dtype=torch.int32, device=weighting.device)
    torch.linalg.cholesky_ex(weighting.mT, out=(weighting.mT, info))
    return weighting.mT.tril_() if info.item() == 0 else None


BLOCK = 2048  # columns a GEMM of add_gram and times_lower takes at a time


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram (n x n, fp32) += X^T X for X = x (N x n, 16-bit or fp32), in its rows of BLOCK at a time from the diagonal
    on: row block i gets X_i^T X[:, i:], so the blocks below the diagonal are left out (zeros where they were). H is
    symmetric and whitening reads its upper triangle: (k + 1) / 2k of the FLOPs for k blocks (4/7 at n = 14336)."""
    for i in range(0, x.shape[1], BLOCK):
        accumulate_outer(gram[i:i + BLOCK, i:], x[:, i:i + BLOCK], x[:, i:])


def times_lower(E: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """E C (m x n) for C lower triangular (n x n), a column block of BLOCK at a time from C's nonzero rows only:
    (E C)[:, j block] = E[:, j:] C[j:, j block]: (k + 1) / 2k of a full product's FLOPs for k blocks (3/4 at
    n = 4096, 4/7 at n = 14336)."""
    out = E.new_empty(E.shape[0], C.shape[1])
    for j in range(0, C.shape[1], BLOCK):
        torch.mm(E[:, j:], C[j:, j:j + BLOCK], out=out[:, j:j + BLOCK])
    return out


def best_correction(error: torch.Tensor, C: Optional[torch.Tensor], rank: int, svd: str = "lowrank") -> Correction:
    """(L (m x rank), R (rank x n)) minimizing ||(error - L R) C||_F (module docstring), fp32, for C from whitening
    (None: zeros). svd: exact, or lowrank (randomized: near the optimum, much faster on large layers; svd.py). A
    layer narrower than the rank gets zeros for the rest."""
    if C is None:
        return _uncorrected(error, rank)
    if C.dim() == 1:
        top = top_singular({"E C": error * C}, rank, svd)["E C"]
        R = top.V.T / C
    else:
        top = top_singular({"E C": times_lower(error, C)}, rank, svd)["E C"]
        R = torch.linalg.solve_triangular(C, top.V.T.contiguous(), upper=False, left=False)  # R C = V^T
    missing = rank - top.S.numel()
    L, R = F.pad(top.U * top.S, (0, missing)).contiguous(), F.pad(R, (0, 0, 0, missing)).contiguous()
    return (L, R) if bool(torch.isfinite(L).all() and torch.isfinite(R).all()) else _uncorrected(error, rank)


def _uncorrected(error: torch.Tensor, rank: int) -> Correction:
    """Zeros, for a layer whose inputs gave no usable weighting (non-finite activations): no correction rather than a
    wrong one."""
    log.warning("a layer's inputs are not finite or their Gram matrix not positive definite; its 4-bit error is left "
                "uncorrected")
    return error.new_zeros(error.shape[0], rank), error.new_zeros(rank, error.shape[1])


def layer_bytes(m: int, n: int, full: bool) -> tuple[int, int]:
    """(held while the layer's group runs its forwards: X^T X or its diagonal, fp32; held besides while its correction
    is computed: W and Q in fp32 and E C, with the Cholesky factor in place of X^T X)."""
    return 4 * n * n if full else 4 * n, 12 * m * n


def nf4_corrections(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], rank: int,
                    budget_bytes: int, weights: OriginalWeights, progress=None,
                    svd: str = "lowrank") -> dict[str, Correction]:
    """name -> (L, R) for every 4-bit target inside the decoder layers whose original weight is in `weights` (the
    others are named in a warning), from the calibration `batches` (input_ids, attention_mask), a group of layers at
    a time holding at most `budget_bytes`; a layer whose X^T X does not fit alone is weighted by its diagonal (named in
    a warning). progress(done, total) at the start and as each group's forwards end and each layer's correction is
    made, in units of half a layer (a layer counts one for its group's forwards and one for its own SVD), so that the
    time left shows, and a stop takes effect, within a group. The model is left as it was found.
    Forwards in which, after the first batch, only block 0 computes keep every block's inputs on the CPU; then each
    group runs only its own blocks, from the hidden state entering its first block, which is carried up past each
    group once its corrections are in place: about two forwards of the network in all, whatever the number of
    groups."""
    shapes = {name: features(module) for name, module in targets.items()}
    found = [n for n in targets if FourBitWeight.of(targets[n]) is not None and weights.has(n, shapes[n])]
    blocks, index = block_layout(model, found)
    names = sorted((n for n in found if index[n] is not None), key=lambda n: index[n])  # stable: model order
    missing = [n for n in targets if n not in names and not isinstance(targets[n], ExpertParameter)]  # said on load
    if missing:
        log.warning("the 4-bit error of %d layer(s) is not corrected (not 4-bit, outside the decoder layers or no "
                    "saved weight found): %s", len(missing), _some(missing))
    full = {n: sum(layer_bytes(*shapes[n], True)) <= budget_bytes for n in names}
    if not all(full.values()):
        log.warning("%d layer(s) have their 4-bit error weighted by input sizes only (their X^T X does not fit "
                    "the %.2f GiB budget; grad_budget_gib raises it): %s", len(full) - sum(full.values()),
                    budget_bytes / 2**30, _some([n for n in names if not full[n]]))
    if not names:
        return {}
    groups = _groups(names, {n: layer_bytes(*shapes[n], full[n]) for n in names}, budget_bytes, index)
    corrections: dict[str, Correction] = {}
    was_training, used_cache = model.training, model.config.use_cache
    originals = ReadAhead(weights, names, shapes, batches[0]["input_ids"].device)
    try:
        model.eval()
        model.config.use_cache = False
        done, total = 0, 2 * len(names)

        def advance(units: int) -> None:
            nonlocal done
            done += units
            if progress:
                progress(done, total)
        advance(0)
        with torch.no_grad(), attention_for({batch["input_ids"].shape[1] for batch in batches}):
            kept, hidden = _block_inputs(model, blocks, batches), None
            at = 0  # hidden: the state entering block `at`, per batch, on the CPU
            for group in groups:
                first, last = index[group[0]], index[group[-1]]
                hidden = _carried(blocks, kept, hidden, at, first, batches)
                at = first
                layers = {n: targets[n] for n in group}
                weightings = _weightings(blocks, kept, hidden, first, last, layers, {n: full[n] for n in group},
                                         batches)
                advance(len(group))
                corrections.update(_group_corrections(layers, weightings, originals, rank, svd, advance))
                replace(model, {n: FrozenLinear(targets[n], corrections[n]) for n in group})  # for the groups above
    finally:
        originals.close()
        replace(model, targets)
        model.train(was_training)
        model.config.use_cache = used_cache
    return corrections


class ReadAhead:
    """The original weights of `names`, in that order (next()), read from the files by a thread one layer ahead, so
    that reading the next layer's overlaps the GPU's work on this one. For a CUDA device each is staged through a
    ring of two page-locked buffers (transfers.HostTransfers: one copied in, one filled ahead) and handed out on the
    device; the buffers hold a 16-bit weight of the largest shape, a wider one is copied the plain way."""

    def __init__(self, weights: OriginalWeights, names: list[str], shapes: dict[str, tuple[int, int]],
                 device: torch.device):
        self.weights, self.shapes = weights, shapes
        self.waiting = list(reversed(names))
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="frugal-loraga-read")
        largest = max((m * n for m, n in map(shapes.__getitem__, names)), default=0)
        self.transfers = HostTransfers(device, 2 * largest, slots=2) if device.type == "cuda" and names else None
        self.pending = self._submit()

    def _submit(self):
        if not self.waiting:
            return None
        name = self.waiting.pop()
        read = self.reader.submit(self.weights.weight, name, self.shapes[name])
        return self.transfers.stage(read) if self.transfers else read

    def __next__(self) -> torch.Tensor:
        original = self.transfers.to_device(self.pending) if self.transfers else self.pending.result()
        self.pending = self._submit()
        return original

    def close(self) -> None:
        """Waits for a read under way (the threads end) and lets go of what it read and of the buffers."""
        self.reader.shutdown(cancel_futures=True)
        if self.transfers:
            self.transfers.close()
        self.pending = None


def _group_corrections(layers: dict[str, nn.Module], weightings: dict[str, torch.Tensor], originals: ReadAhead,
                       rank: int, svd: str, advance) -> dict[str, Correction]:
    """Each layer's correction in order, its weighting taken out of `weightings` (emptied) and whitened once for the
    layers that share it, each let go after the last layer that uses it."""
    last_user = {id(weightings[name]): name for name in layers}  # all alive: the ids are distinct
    whitened: dict[int, Optional[torch.Tensor]] = {}
    corrections = {}
    for name, layer in layers.items():
        weighting = weightings.pop(name)
        key = id(weighting)
        if key not in whitened:
            whitened[key] = whitening(weighting)
        C = whitened.pop(key) if last_user[key] == name else whitened[key]
        del weighting
        corrections[name] = _correction(layer, next(originals), C, rank, svd)
        del C
        advance(1)
    return corrections


def _correction(layer: nn.Module, original: torch.Tensor, C: Optional[torch.Tensor], rank: int,
                svd: str) -> Correction:
    """The layer's (L, R) from its original weight (as saved; moved to the layer's device if not there yet, and widened
    there rather than on the CPU: half the bytes to copy) and its inputs' whitening C, the same bits on every rank."""
    dequantized = FourBitWeight.of(layer)().float()
    error = original.to(dequantized.device, non_blocking=True).float().sub_(dequantized)
    del dequantized
    correction = best_correction(error, C, rank, svd)
    from_rank0_(list(correction))  # under torchrun: rank 0's on every rank
    return correction


def _block_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[dict]) -> KeptInputs:
    """Every block's other inputs and block 0's hidden state for each batch, on the CPU, from forwards of the base
    model (no head). What a block is given besides the hidden state (masks, rotary embeddings, positions) is made by
    the family's layer loop, not by the blocks below, so after a full forward of the first batch the others run block
    0 alone, the blocks above returning its output. The first batch checks that, by running it both ways; a family
    whose blocks' inputs differ (one passing something a block computed to the next) gets full forwards throughout."""
    kept = KeptInputs(len(batches), len(blocks), [0])
    _keep_inputs(model, blocks, batches[0], kept, 0, block_0_alone=False)
    probe = KeptInputs(1, len(blocks), [0])
    _keep_inputs(model, blocks, batches[0], probe, 0, block_0_alone=True)
    if batches[0]["input_ids"].is_cuda:  # the copies to the CPU are asynchronous
        torch.cuda.synchronize(batches[0]["input_ids"].device)
    block_0_alone = identical(probe.others[0], kept.others[0])
    if not block_0_alone:
        log.info("this model's blocks are given inputs that depend on the blocks below: the correction's first pass "
                 "runs every block")
    for index in range(1, len(batches)):
        _keep_inputs(model, blocks, batches[index], kept, index, block_0_alone)
    return kept


def _keep_inputs(model: nn.Module, blocks: list[nn.Module], batch: dict, kept: KeptInputs, index: int,
                 block_0_alone: bool) -> None:
    """Keep each block's inputs for this batch (as batch `index`) from a forward of the base model; with
    block_0_alone, the blocks above block 0 return its output instead of computing their own."""
    first_output = []
    handles = [blocks[0].register_forward_hook(lambda m, args, output: first_output.append(output))]
    own_forwards = [block.__dict__.get("forward") for block in blocks]  # compile_blocks sets one on the instance
    try:
        handles += [block.register_forward_pre_hook(
            lambda m, args, kwargs, j=j: kept.keep(j, index, args, kwargs), with_kwargs=True)
            for j, block in enumerate(blocks)]
        if block_0_alone:
            for block in blocks[1:]:
                block.forward = lambda *args, **kwargs: first_output[0]
        model.base_model(input_ids=batch["input_ids"])  # the caller's no_grad; the base model has no head
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in zip(blocks, own_forwards):
            block.__dict__.pop("forward", None)
            if forward is not None:
                block.forward = forward


def _carried(blocks: list[nn.Module], kept: KeptInputs, hidden: Optional[list], start: int, stop: int,
             batches: list[dict]) -> list[torch.Tensor]:
    """The hidden state entering block `stop` for each batch (CPU), run up from the one entering `start` (None: the
    kept one entering block 0) through the blocks between, as they are now (corrected)."""
    device = batches[0]["input_ids"].device
    if hidden is None:
        hidden = [kept.kept_hidden(0, b, "cpu") for b in range(len(batches))]
    if start == stop:
        return hidden
    return [moved(run_blocks(blocks[start:stop], hidden[b].to(device), kept.inputs(b, start, stop, device, {})), "cpu")
            for b in range(len(batches))]


def _some(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def _groups(names: list[str], costs: dict[str, tuple[int, int]], budget_bytes: int,
            index: dict[str, int]) -> list[list[str]]:
    """Consecutive layers (model order) whose held bytes together, plus the most any one of them holds besides,
    fit the budget, taken a decoder layer (block) at a time where a whole block fits: a group ending inside a block
    would lose the sums its layers share there and run that block again for the next group. A block that does not
    fit alone is split between groups a layer at a time (a layer alone always makes a group)."""
    def fits(layers: list[str]) -> bool:
        return sum(costs[n][0] for n in layers) + max(costs[n][1] for n in layers) <= budget_bytes

    groups: list[list[str]] = []
    for _, block in itertools.groupby(names, key=index.__getitem__):
        block = list(block)
        for unit in [block] if fits(block) else [[name] for name in block]:
            if groups and fits(groups[-1] + unit):
                groups[-1] += unit
            else:
                groups.append(unit)
    return groups


class InputSharing:
    """Which layers are called on the very input the layer called just before them got (q, k and v; gate and up),
    and so may add it to that layer's sum instead of their own. A layer's leader (the layer whose sum it shares, or
    None) is settled by its first call, and only where that is also its leader's first call (a sum holding inputs
    from before is no sharer's); every later call must repeat it, and in each batch a sharer must be called as often
    as its leader, else RuntimeError: its sum would miss inputs or count others. Inference tensors, which keep no
    count of in-place changes, are never shared."""

    def __init__(self, full: dict[str, bool]):
        self.full = full  # a full X^T X shares only with a full one, a diagonal with a diagonal
        self.leaders: dict[str, Optional[str]] = {}
        self.calls: dict[str, int] = {}  # in this batch
        self.ever: dict[str, int] = {}  # in all batches
        self.previous: Optional[tuple] = None  # the last call: (name, a weak reference to its input, its version)

    def leader(self, name: str, x: torch.Tensor) -> Optional[str]:
        """The layer whose sum this call's input goes to, or None for the layer's own."""
        same, version = None, None if x.is_inference() else x._version
        if self.previous is not None and version is not None:
            before, seen, before_version = self.previous
            if before != name and seen() is x and before_version == version and self.full[before] == self.full[name]:
                same = before
        self.previous = (name, weakref.ref(x), version)  # weak: the input's memory is not held
        self.calls[name] = self.calls.get(name, 0) + 1
        self.ever[name] = self.ever.get(name, 0) + 1
        if name not in self.leaders:
            self.leaders[name] = same if same is not None and self.ever[same] == 1 else None
        leader = self.leaders[name]
        if leader is not None and same != leader:
            raise RuntimeError(f"{name} was called on {leader}'s input on an earlier batch but not now: its 4-bit "
                               "error cannot be corrected; set nf4_error_rank=0 to train without the correction")
        return leader

    def end_batch(self) -> None:
        for name, leader in self.leaders.items():
            if leader is not None and self.calls.get(name, 0) != self.calls.get(leader, 0):
                raise RuntimeError(f"{name} shares {leader}'s input but was called {self.calls.get(name, 0)} "
                                   f"time(s) in a batch to its {self.calls.get(leader, 0)}: its 4-bit error cannot be "
                                   "corrected; set nf4_error_rank=0 to train without the correction")
        self.calls.clear()
        self.previous = None


def _weightings(blocks: list[nn.Module], kept: KeptInputs, hidden: list[torch.Tensor], first: int, last: int,
                layers: dict[str, nn.Module], full: dict[str, bool], batches: list[dict]) -> dict[str, torch.Tensor]:
    """name -> X^T X (n x n, fp32: its upper triangle, add_gram), or its diagonal where not full, of each layer's
    inputs at the batches' tokens (attention_mask; pads left out), from runs of blocks first .. last from the hidden
    state entering `first`. Layers called on the input of the layer called just before them (InputSharing) share
    its sum, the same tensor under each name: their input is accumulated once."""
    device = batches[0]["input_ids"].device
    sums: dict[str, torch.Tensor] = {}  # each layer's from its first call: its own, or its leader's
    sharing = InputSharing(full)
    tokens = {}  # the current batch's token rows (flat index into B x T) and its number of pads

    def zeros(name: str) -> torch.Tensor:
        n = features(layers[name])[1]
        return torch.zeros((n, n) if full[name] else (n,), device=device)

    def accumulate(name: str, x: torch.Tensor) -> None:
        leader = sharing.leader(name, x)
        if name not in sums:
            sums[name] = zeros(name) if leader is None else sums[leader]
        if leader is not None:
            return
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == tokens["index"].numel() + tokens["pads"]:  # (B x T) tokens, as most layers see them
            rows = rows.index_select(0, tokens["index"])  # else (experts: tokens routed to them) all rows
        if full[name]:
            add_gram(sums[name], rows)
        else:
            sums[name].add_(rows.float().square().sum(0))

    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: accumulate(name, args[0]))
               for name, layer in layers.items()]
    try:
        for b, batch in enumerate(batches):
            mask = batch["attention_mask"].flatten().bool()
            tokens["index"], tokens["pads"] = mask.nonzero().squeeze(1), int((~mask).sum())
            run_blocks(blocks[first:last + 1], hidden[b].to(device), kept.inputs(b, first, last + 1, device, {}))
            sharing.end_batch()
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] if name in sums else zeros(name) for name in layers}  # zeros: never called (an expert)
