"""The group's top-k SVDs (frugal_loraga/svd.py) against torch.linalg.svd, and against torch.svd_lowrank, which the
estimate used before."""
import pytest
import torch

from frugal_loraga.fidelity import captured_energy
from frugal_loraga.svd import orthonormal_bases, randomized_svds, top_singular

K = 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """A random m x n matrix (fp32) with the given singular values (the rest 0)."""
    generator = torch.Generator().manual_seed(seed)
    r = singular_values.numel()
    U = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
    return ((U * singular_values.double()) @ V.T).float().to(DEVICE)


def assert_orthonormal_columns(M: torch.Tensor, atol: float):
    torch.testing.assert_close(M.T @ M, torch.eye(M.shape[1], device=M.device), rtol=0, atol=atol)


def test_randomized_svds_match_the_exact_top_k_across_shapes():
    """Several layers of shapes that are not powers of two, wide and tall, with decaying spectra, at once: the
    singular values, the rank-k reconstruction and the captured energy of the exact top-k; orthonormal U and V."""
    torch.manual_seed(0)
    shapes = [(300, 170), (97, 411), (1000, 64), (300, 170)]
    Gs = [with_spectrum(m, n, 0.8 ** torch.arange(min(m, n), dtype=torch.float64), seed)
          for seed, (m, n) in enumerate(shapes)]
    for G, svd in zip(Gs, randomized_svds(Gs, K)):
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        assert svd.U.shape == (G.shape[0], K) and svd.V.shape == (G.shape[1], K) and svd.S.shape == (K,)
        torch.testing.assert_close(svd.S.double(), S[:K], rtol=1e-5, atol=0)
        torch.testing.assert_close((svd.U * svd.S @ svd.V.T).double(), U[:, :K] * S[:K] @ Vh[:K], rtol=0, atol=1e-5)
        assert captured_energy(G, svd.U, svd.V) > 1 - 1e-6
        assert_orthonormal_columns(svd.U, 1e-5)
        assert_orthonormal_columns(svd.V, 1e-5)


def test_slowly_decaying_spectrum_as_well_as_torch_svd_lowrank():
    """A gradient-like spectrum (s_i = i^-1/2, no gap after k): at least the energy torch.svd_lowrank captures with
    the same sketch (q = 2k) and power iterations (4), on the same matrices."""
    torch.manual_seed(0)
    Gs = [with_spectrum(400, 256, torch.arange(1, 257, dtype=torch.float64) ** -0.5, seed) for seed in range(3)]
    ours = [captured_energy(G, s.U, s.V) for G, s in zip(Gs, randomized_svds(Gs, K))]
    theirs = []
    for G in Gs:
        U, _, V = torch.svd_lowrank(G, q=2 * K, niter=4)
        theirs.append(captured_energy(G, U[:, :K], V[:, :K]))
    assert min(ours) > 0.98, ours
    assert sum(ours) / 3 > sum(theirs) / 3 - 0.005, (ours, theirs)


@pytest.mark.parametrize("spectrum", ["rank 3", "ill-conditioned"])
def test_rank_deficient_and_ill_conditioned_gradients(spectrum):
    """Rank 3 < k (as with a handful of tokens): the 3 triplets exact, the rest zero, no NaN. Singular values from 1
    down to 1e-9: the directions fp32 resolves exact, U and V orthonormal, no NaN."""
    torch.manual_seed(0)
    values = (torch.tensor([3.0, 2.0, 1.0]) if spectrum == "rank 3" else
              torch.logspace(0, -9, 60, dtype=torch.float64))
    G = with_spectrum(200, 150, values, seed=1)
    svd = randomized_svds([G], K)[0]
    assert all(torch.isfinite(t).all() for t in (svd.U, svd.S, svd.V))
    exact = torch.linalg.svdvals(G.double())[:K]
    torch.testing.assert_close(svd.S.double(), exact, rtol=1e-4, atol=1e-6)
    if spectrum == "rank 3":
        assert svd.S[3:].abs().max() < 1e-6
        assert captured_energy(G, svd.U[:, :3], svd.V[:, :3]) > 1 - 1e-6
    else:
        assert captured_energy(G, svd.U, svd.V) > 1 - 1e-6
        assert_orthonormal_columns(svd.U, 1e-5)
        assert_orthonormal_columns(svd.V, 1e-5)


def test_orthonormal_bases_zero_the_directions_a_matrix_lacks():
    """Y of rank 2 with 4 columns: two orthonormal columns spanning Y's columns, two zero columns."""
    torch.manual_seed(0)
    Y = torch.randn(50, 2, device=DEVICE) @ torch.randn(2, 4, device=DEVICE)
    Q = orthonormal_bases([Y, torch.randn(30, 4, device=DEVICE)])[0]
    norms = Q.norm(dim=0).sort().values
    torch.testing.assert_close(norms, torch.tensor([0.0, 0.0, 1.0, 1.0], device=DEVICE), rtol=0, atol=1e-6)
    torch.testing.assert_close(Q @ (Q.T @ Y), Y, rtol=0, atol=1e-4)


def test_top_singular_takes_small_layers_exactly_and_keeps_the_order():
    """lowrank: a layer with min(m, n) <= 2k (too narrow for the sketch) goes to torch.linalg.svd; exact: every
    layer does. Results come back in the input's order, and match the exact top-k."""
    torch.manual_seed(0)
    Gs = {"big": with_spectrum(120, 90, 0.7 ** torch.arange(90.0), 0),
          "small": with_spectrum(120, 2 * K, 0.7 ** torch.arange(2.0 * K), 1),
          "other": with_spectrum(64, 70, 0.7 ** torch.arange(64.0), 2)}
    for method in ("lowrank", "exact"):
        svds = top_singular(Gs, K, method)
        assert list(svds) == list(Gs)
        for name, G in Gs.items():
            U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
            # 1e-4 (s_1 = 1): cuSOLVER's fp32 SVD on an H100 was off by 3e-5
            torch.testing.assert_close(svds[name].S.double(), S[:K], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close((svds[name].U * svds[name].S @ svds[name].V.T).double(),
                                       U[:, :K] * S[:K] @ Vh[:K], rtol=0, atol=1e-4)
