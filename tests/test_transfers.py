"""Copies between the GPU and host memory: the page-locked ring (frugal_loraga/transfers.py) and the input embedding
looked up in CPU memory (models.HostEmbedding)."""
import pytest
import torch

from frugal_loraga.models import HostEmbedding
from frugal_loraga.transfers import HostTransfers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: the ring copies on CUDA streams; on CPU nothing is moved")


def made_on_gpu(shape, dtype, seed):
    """A tensor whose value comes from a long queue of kernels, so a copy that did not wait for them reads garbage."""
    generator = torch.Generator("cuda").manual_seed(seed)
    a = torch.randn(2048, 2048, device="cuda", generator=generator)
    for _ in range(20):
        a = torch.tanh(a @ a / 2048 ** 0.5)  # bounded: no inf or nan
    value = a.flatten()[:torch.Size(shape).numel()].reshape(shape)
    return (value > 0) if dtype == torch.bool else value.to(dtype)


def test_to_host_and_back_in_stream_order_through_a_full_ring():
    """Twelve tensors through a ring of 3 slots of 64 KiB (the caller waits for free slots), of several dtypes and
    shapes, one larger than a slot: each comes back to the CPU equal to its value on the GPU, and the staged copies
    come back to the GPU equal again, staged one ahead of use."""
    transfers = HostTransfers(torch.device("cuda"), slot_bytes=64 * 1024, slots=3)
    try:
        cases = [((5, 7, 11), torch.bfloat16), ((300, 100), torch.float32), ((), torch.float32), ((3, 1000), torch.bool),
                 ((129,), torch.int64), ((0, 4), torch.float16)] * 2
        gpu = [made_on_gpu(shape, dtype, seed) for seed, (shape, dtype) in enumerate(cases)]
        futures = [transfers.to_host(t) for t in gpu]
        host = [f.result() for f in futures]
        for t, h in zip(gpu, host):
            assert h.device.type == "cpu" and not h.is_pinned()
            assert h.dtype == t.dtype and h.shape == t.shape
            torch.testing.assert_close(h, t.cpu(), rtol=0, atol=0)
        sources = futures[:2] + host[2:]  # staged from futures and from tensors, one ahead, as the estimate does
        staged, back = [transfers.stage(sources[0])], []
        for i in range(len(sources)):
            if i + 1 < len(sources):
                staged.append(transfers.stage(sources[i + 1]))
            back.append(transfers.to_device(staged.pop(0)))
        for t, b in zip(gpu, back):
            assert b.device == t.device
            torch.testing.assert_close(b, t, rtol=0, atol=0)
    finally:
        transfers.close()


class ScaledEmbedding(torch.nn.Embedding):
    """An embedding of a model's own, as Gemma's scales its rows: HostEmbedding runs its forward."""

    def forward(self, input_ids):
        return super().forward(input_ids) * 2.5


@pytest.mark.parametrize("table", [torch.nn.Embedding, ScaledEmbedding])
def test_host_embedding_rows_reach_the_gpu_equal_while_earlier_copies_are_in_flight(table):
    """HostEmbedding gathers into page-locked memory and copies without waiting: six lookups queued behind a long
    GPU queue, none synchronized, each equal to the table's own lookup (a reused buffer overwritten before its copy
    ran would fail). Token ids on the GPU, as training's batches hold them, and on the CPU."""
    torch.manual_seed(0)
    embedding = table(1000, 96, dtype=torch.bfloat16)
    host = HostEmbedding(embedding, torch.device("cuda"))
    ids = [torch.randint(0, 1000, (2, 37)) for _ in range(6)]
    expected = [embedding(i) for i in ids]
    rows = []
    for n, i in enumerate(ids):
        made_on_gpu((4,), torch.float32, n)  # work queued ahead of the copy
        rows.append(host(i.cuda() if n % 2 else i))
    for r, e in zip(rows, expected):
        assert r.device.type == "cuda" and r.shape == (2, 37, 96)
        torch.testing.assert_close(r.cpu(), e, rtol=0, atol=0)
