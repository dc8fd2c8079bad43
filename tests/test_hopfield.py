"""Section 3: the pseudo-likelihood Hopfield network. Run: python -m pytest -q tests/test_hopfield.py"""
import os

import torch

import eval as ev
import plot
import udlm


def spins(P, L, seed):
    return ev.random_spins(P, L, torch.Generator().manual_seed(seed))


def test_analytic_gradient_eq9_equals_autograd_of_eq8():
    x = spins(30, 20, 0)
    W = (0.3 * torch.randn(20, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(udlm.pseudo_likelihood_loss(W, x), W)
    torch.testing.assert_close(udlm.pseudo_likelihood_grad(W.detach(), x), grad)
    assert grad.diagonal().abs().max() == 0  # no self-coupling


def test_conditional_eq7_is_the_logistic_of_twice_the_field():
    x, W = spins(5, 12, 2), udlm.hebbian_couplings(spins(4, 12, 3))
    f = udlm.local_field(W, x)
    torch.testing.assert_close(udlm.spin_conditional(W, x), torch.exp(f) / (2 * torch.cosh(f)))


def test_pseudo_likelihood_stores_half_load_random_patterns_and_hebbian_does_not():
    L = 100
    x = spins(L // 2, L, 4)
    W_pl, W_hebb = udlm.train_pseudo_likelihood(x), udlm.hebbian_couplings(x)
    assert udlm.hopfield_margin(W_pl, x).min() > 0  # every pattern a fixed point, with a positive margin
    s, converged = udlm.hopfield_retrieve(W_pl, x)
    assert torch.equal(s, x) and converged.all()
    assert (udlm.hopfield_margin(W_hebb, x).min(-1).values > 0).double().mean() < 0.1  # gamma = 0.5 >> 0.14


def test_retrieval_from_ten_percent_flips_at_low_load_for_both_rules():
    L, g = 200, torch.Generator().manual_seed(5)
    x = spins(10, L, 6)  # gamma = 0.05
    for W in (udlm.hebbian_couplings(x), udlm.train_pseudo_likelihood(x)):
        recovery, exact, s, converged = ev.spin_recovery(W, x, g, p=0.1)
        assert recovery == 1.0 and exact == 1.0 and converged == 1.0


def test_hopfield_command_and_plot(tmp_path):
    path = ev.hopfield(str(tmp_path), L=40, seed=0, pl_steps=100, quiet=True)
    records = plot.load(path)
    assert len(records["hopfield_capacity"]) == 20 and len(records["hopfield_generalization"]) == 16
    small = [r for r in records["hopfield_capacity"] if r["gamma"] == 0.05]
    assert all(r["fixed_points"] == 1.0 for r in small)
    assert plot.main([str(tmp_path)]) == 0 and os.path.getsize(tmp_path / "hopfield.png") > 10000
