import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drrl_env.attention import spectra
from drrl_env.attention.spectra import block_spectrum, power_iteration_spectral_norm


def reference_svd(x: torch.Tensor):
    return torch.linalg.svd(x.double(), full_matrices=False)


def test_singular_values_match_float64_svd():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 200, 32) * torch.logspace(0, -3, 32)  # decaying spectrum
    spectrum = block_spectrum(x)
    _, s_ref, _ = reference_svd(x)
    scale = s_ref[..., :1]
    # energies carry an absolute error of order eps * sigma_1^2
    assert torch.allclose(spectrum.energies, s_ref.square(), atol=1e-5 * float(scale.max() ** 2), rtol=0)
    assert torch.allclose(spectrum.singular_values[..., :8], s_ref[..., :8], rtol=1e-4)
    assert bool((spectrum.singular_values[..., :-1] >= spectrum.singular_values[..., 1:]).all())


def test_top_subspace_matches_float64_svd():
    torch.manual_seed(1)
    x = torch.randn(4, 300, 16) @ torch.diag(torch.linspace(10, 0.1, 16))
    spectrum = block_spectrum(x)
    _, _, vh = reference_svd(x)
    for r in (1, 4, 8):
        projector = spectrum.right_vectors[..., :r] @ spectrum.right_vectors[..., :r].transpose(-1, -2)
        projector_ref = vh[..., :r, :].transpose(-1, -2) @ vh[..., :r, :]
        assert torch.allclose(projector, projector_ref, atol=1e-4)


def test_root_factor_reproduces_gram():
    torch.manual_seed(2)
    x = torch.randn(2, 64, 16).double()
    spectrum = block_spectrum(x)
    r = spectrum.root_factor()
    assert torch.allclose(r.transpose(-1, -2) @ r, x.transpose(-1, -2) @ x, atol=1e-9)


def test_degenerate_blocks_give_no_nan():
    zero = torch.zeros(2, 50, 8)
    rank_one = torch.randn(2, 50, 1) @ torch.randn(2, 1, 8)
    ill = torch.randn(2, 50, 8) * torch.tensor([1e4, 1, 1, 1, 1, 1, 1, 1e-6])
    for x in (zero, rank_one, ill):
        spectrum = block_spectrum(x)
        assert torch.isfinite(spectrum.singular_values).all()
        assert torch.isfinite(spectrum.right_vectors).all()
        assert bool((spectrum.singular_values >= 0).all())
    assert torch.equal(block_spectrum(zero).singular_values, torch.zeros(2, 8, dtype=torch.float64))
    assert float(block_spectrum(rank_one).singular_values[..., 1:].max()) < 1e-3 * float(
        block_spectrum(rank_one).singular_values[..., 0].min()
    )


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 40), cols=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_power_iteration_converges_from_below(rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(m, ord=2)
    estimate_3 = power_iteration_spectral_norm(m, 3, torch.Generator().manual_seed(seed))
    estimate_200 = power_iteration_spectral_norm(m, 200, torch.Generator().manual_seed(seed))
    assert float(estimate_3) <= float(exact) * (1 + 1e-12)
    # convergence goes as (sigma_2 / sigma_1)^(2k): only claim it where the top gap is not tiny
    sigma = torch.linalg.svdvals(m)
    if len(sigma) > 1 and float(sigma[1]) > 0.95 * float(sigma[0]):
        return
    assert abs(float(estimate_200) - float(exact)) <= 1e-6 * float(exact)


def test_power_iteration_is_batched():
    m = torch.randn(5, 7, 30, 20)
    estimate = power_iteration_spectral_norm(m, 100)
    assert estimate.shape == (5, 7)
    assert torch.allclose(estimate, torch.linalg.matrix_norm(m.double(), ord=2), rtol=1e-5)


def test_eigh_solver_is_the_host_on_cuda_unless_asked(monkeypatch):
    monkeypatch.setattr(spectra, "_eigh_solver", None)
    monkeypatch.delenv("DRRL_EIGH_SOLVER", raising=False)
    assert spectra.eigh_solver_for(torch.device("cuda")) == "host"
    assert spectra.eigh_solver_for(torch.device("cpu")) == "device"
    monkeypatch.setenv("DRRL_EIGH_SOLVER", "device")
    assert spectra.eigh_solver_for(torch.device("cuda")) == "device"
    spectra.set_eigh_solver("host")  # the setter wins over the environment variable
    assert spectra.eigh_solver_for(torch.device("cuda")) == "host"
    with pytest.raises(ValueError, match="eigh solver 'lapack': expected one of auto, device, host"):
        spectra.set_eigh_solver("lapack")
    monkeypatch.setattr(spectra, "_eigh_solver", None)
    monkeypatch.setenv("DRRL_EIGH_SOLVER", "magma")
    with pytest.raises(ValueError, match="DRRL_EIGH_SOLVER='magma'"):
        spectra.symmetric_eigh(torch.eye(3, device="cuda" if torch.cuda.is_available() else "meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host solver differs from the device's only on a GPU")
@pytest.mark.parametrize("solver", ["host", "device"])
def test_every_solver_matches_the_float64_cpu_reference_on_a_gpu(solver, monkeypatch):
    monkeypatch.setattr(spectra, "_eigh_solver", solver)
    torch.manual_seed(3)
    x = (torch.randn(2, 9, 256, 64) * torch.logspace(0, -4, 64)).double()  # decaying, as real keys; float64 Grams
    reference = block_spectrum(x)  # CPU float64 LAPACK
    on_gpu = block_spectrum(x.cuda())
    scale = float(reference.singular_values[..., 0].max() ** 2)
    torch.testing.assert_close(on_gpu.energies.cpu(), reference.energies, atol=1e-10 * scale, rtol=0)
    for r in (8, 32):  # the subspaces the low-rank attention projects on
        top, top_ref = on_gpu.right_vectors[..., :r].cpu(), reference.right_vectors[..., :r]
        torch.testing.assert_close(top @ top.transpose(-1, -2), top_ref @ top_ref.transpose(-1, -2), atol=1e-6, rtol=0)
