import torch

from model.ops import coupled_selective_scan


def test_identity_coupling_runs_and_is_finite() -> None:
    g = torch.Generator().manual_seed(0)
    M, b, d, n, L = 3, 2, 4, 5, 7
    u = torch.randn(M, b, d, L, generator=g)
    delta = torch.rand(M, b, d, L, generator=g)
    A = -torch.rand(M, d, n, generator=g)
    B = torch.randn(M, b, n, L, generator=g)
    C = torch.randn(M, b, n, L, generator=g)
    y = coupled_selective_scan(u, delta, A, B, C)
    assert y.shape == (M, b, d, L)
    assert torch.isfinite(y).all()
