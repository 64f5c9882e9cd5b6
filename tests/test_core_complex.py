"""Complex numbers (JAX's rule, torch's gradient convention), against closed forms and
finite differences; reverse and forward mode agree wherever both are defined."""

import pytest
import torch

import functx

C = torch.complex128
D = torch.float64


def _z(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=C, generator=g)


def test_real_input_complex_output_is_refused_not_zero():
    x = torch.randn(3, dtype=D)
    for jac in (functx.jacrev, functx.jacfwd):
        with pytest.raises(TypeError, match=r"complex output is defined only for a holomorphic function"):
            jac(lambda x: x * 1j)(x)
    with pytest.raises(TypeError, match=r"holomorphic=True"):
        functx.hessian(lambda x: (x * 1j).sum())(x)


@pytest.mark.parametrize("jac", [functx.jacrev, functx.jacfwd])
def test_holomorphic_gives_df_dz_in_both_modes(jac):
    z = _z()
    torch.testing.assert_close(jac(lambda z: 1j * z, holomorphic=True)(z), 1j * torch.eye(3, dtype=C))
    f = lambda z: torch.sin(z) * z
    J = jac(f, holomorphic=True)(z)
    torch.testing.assert_close(J, torch.diag(torch.cos(z) * z + torch.sin(z)))
    # against a complex-step finite difference along a real direction: (f(z + h) - f(z - h)) / 2h
    h = 1e-6
    fd = torch.stack([(f(z + h * e) - f(z - h * e)) / (2 * h) for e in torch.eye(3, dtype=C)], dim=-1)
    torch.testing.assert_close(J, fd, rtol=1e-6, atol=1e-8)


def test_holomorphic_requires_complex_inputs_and_outputs():
    with pytest.raises(TypeError, match=r"with holomorphic=True every differentiated input must be a complex"):
        functx.jacrev(lambda x: x * 1j, holomorphic=True)(torch.ones(2, dtype=D))
    with pytest.raises(TypeError, match=r"with holomorphic=True every differentiated output must be a complex"):
        functx.jacfwd(lambda z: z.abs(), holomorphic=True)(_z())
    with pytest.raises(TypeError, match="`holomorphic` must be a bool"):
        functx.jacrev(torch.sin, holomorphic=1)


def test_real_output_of_complex_input_follows_grad_convention_in_both_modes():
    z = _z()
    f = lambda z: torch.stack([(z.abs() ** 2).sum(), z[0].real * z[1].imag])
    # du/dx + i du/dy, row by row
    expected = torch.zeros(2, 3, dtype=C)
    expected[0] = 2 * z
    expected[1, 0] = z[1].imag
    expected[1, 1] = 1j * z[0].real
    torch.testing.assert_close(functx.jacrev(f)(z), expected)
    torch.testing.assert_close(functx.jacfwd(f)(z), expected)
    g = functx.grad(lambda z: (z.abs() ** 2).sum())(z)
    torch.testing.assert_close(g, 2 * z)  # torch's convention; JAX returns the conjugate, 2 * conj(z)


def test_mixed_real_and_complex_inputs_forward_equals_reverse():
    z, x = _z(2), torch.randn(2, dtype=D)
    f = lambda p: (p["z"].abs() ** 2 * p["x"]).sum().reshape(1) * torch.ones(2, dtype=D)
    p = {"z": z, "x": x}
    Jr, Jf = functx.jacrev(f)(p), functx.jacfwd(f)(p)
    for k in p:
        assert Jr[k].dtype == p[k].dtype == Jf[k].dtype
        torch.testing.assert_close(Jr[k], Jf[k])


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_holomorphic_hessian(mode):
    z = _z()
    H = functx.hessian(lambda z: (torch.sin(z) * z).sum(), holomorphic=True, mode=mode)(z)
    torch.testing.assert_close(H, torch.diag(2 * torch.cos(z) - z * torch.sin(z)))


def test_hessian_of_complex_inputs_needs_holomorphic():
    with pytest.raises(TypeError, match=r"`functx.hessian`: differentiated input z is .*complex.*holomorphic=True"):
        functx.hessian(lambda z: (z.abs() ** 2).sum())(_z())


def test_holomorphic_under_vmap_and_composed():
    zs = torch.stack([_z(3, s) for s in range(4)])
    f = lambda z: torch.exp(z) * z
    batched = functx.vmap(functx.jacrev(f, holomorphic=True))(zs)
    fwd = functx.vmap(functx.jacfwd(f, holomorphic=True))(zs)
    for i in range(4):
        torch.testing.assert_close(batched[i], torch.diag(torch.exp(zs[i]) * (zs[i] + 1)))
    torch.testing.assert_close(batched, fwd)
    # second derivative by composition: jacfwd(jacrev) == the holomorphic Hessian
    z = zs[0]
    g = lambda z: (torch.exp(z) * z).sum()
    H = functx.jacfwd(functx.jacrev(g, holomorphic=True), holomorphic=True)(z)
    torch.testing.assert_close(H, functx.hessian(g, holomorphic=True)(z))
    torch.testing.assert_close(H, torch.diag(torch.exp(z) * (z + 2)))
