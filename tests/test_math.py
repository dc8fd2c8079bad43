"""The method against closed forms, brute force and Monte Carlo. Run: python -m pytest -q tests/test_math.py"""
import math

import pytest
import torch
import torch.nn.functional as F

import udlm


def sigmoid_sqrt(gamma):
    return torch.sigmoid(-torch.as_tensor(gamma, dtype=torch.float64)).sqrt()


# ---- Gaussian -> uniform transformation T, Eqs. (18)-(19) ----

def test_T_matches_duo_anchor_values():
    # duo-spec 1.4 (standard normal pdf): K = 30522 and K = 50257 at several gamma.
    anchors = {-3.0: (0.63788109, 0.59625285), -3.5: (0.94170575, 0.92834739), -1.75: (0.04868304, 0.03828194),
               -1.0: (0.00849033, 0.00618631)}
    for gamma, (a30522, a50257) in anchors.items():
        assert udlm.gaussian_to_uniform(sigmoid_sqrt(gamma), 30522).item() == pytest.approx(a30522, abs=5e-8)
        assert udlm.gaussian_to_uniform(sigmoid_sqrt(gamma), 50257).item() == pytest.approx(a50257, abs=5e-8)
    assert udlm.gaussian_to_uniform(torch.tensor(0.975999, dtype=torch.float64), 30522).dtype == torch.float64


@pytest.mark.parametrize("K", [2, 10, 1000])
def test_T_matches_monte_carlo_argmax_probability(K):
    g = torch.Generator().manual_seed(0)
    alpha_tilde = torch.tensor([0.2, 0.5, 0.8, 0.95], dtype=torch.float64)
    n = 20000 if K == 1000 else 200000
    for a in alpha_tilde:
        w = math.sqrt(1 - a**2) * torch.randn(n, K, generator=g, dtype=torch.float64)
        w[:, 0] += a  # the true class is 0
        p_mc = (w.argmax(-1) == 0).double().mean().item()
        alpha = udlm.gaussian_to_uniform(a, K).item()
        p = alpha + (1 - alpha) / K  # P(argmax = x) = [T x + (1 - T)/K]_x, Eq. (18)
        assert abs(p - p_mc) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4


def test_T_is_monotone_from_zero_to_one_and_its_derivative_matches_finite_differences():
    a = torch.linspace(0.0, 0.999, 400, dtype=torch.float64)
    alpha = udlm.gaussian_to_uniform(a, 4096)
    assert alpha[0].item() == pytest.approx(0.0, abs=1e-9)  # alpha~ = 0: argmax is uniform
    assert alpha[-1].item() > 0.999 and (alpha.diff() > 0).all()
    h = 1e-6
    a = torch.tensor([0.3, 0.9, 0.97, 0.985], dtype=torch.float64)
    fd = (udlm.gaussian_to_uniform(a + h, 4096) - udlm.gaussian_to_uniform(a - h, 4096)) / (2 * h)
    torch.testing.assert_close(udlm.gaussian_to_uniform_derivative(a, 4096), fd, rtol=1e-5, atol=1e-8)


def test_curriculum_schedule_alpha_range_and_derivative():
    # duo-spec: gamma in [-3.5, -1.75] maps to alpha in [0.0487, 0.9417] at K = 30522; d alpha/d gamma = -0.8064 at -3.
    t = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    alpha, dalpha, _ = udlm.alpha_curriculum(t, 30522, -3.5, -2.5)
    assert alpha[0].item() == pytest.approx(0.94170575, abs=1e-7)
    assert alpha[2].item() == pytest.approx(0.63788109, abs=1e-7)
    assert dalpha[2].item() == pytest.approx(-0.8063968, abs=1e-6)  # dgamma/dt = 1 here


def test_loglinear_schedule_endpoints():
    alpha, dalpha = udlm.alpha_loglinear(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert alpha.tolist() == pytest.approx([1.0, 1e-3])
    assert dalpha.tolist() == pytest.approx([-0.999, -0.999])
    t = udlm.sample_t(1000, torch.Generator().manual_seed(0))
    assert t.min() >= udlm.T_MIN and t.max() <= 1
    u = (t - udlm.T_MIN) / (1 - udlm.T_MIN)
    assert torch.histc(u, bins=10, min=0, max=1).tolist() == [100.0] * 10  # one draw per stratum


# ---- forward process, Eqs. (1), (20) ----

def test_forward_marginals_match_alpha_x_plus_uniform():
    K, n = 5, 400000
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1), 3)
    for a in (0.1, 0.5, 0.9):
        z = udlm.q_xt(x, torch.full((n,), a), K, g)
        freq = torch.bincount(z.ravel(), minlength=K).double() / n
        want = torch.full((K,), (1 - a) / K, dtype=torch.float64)
        want[3] += a
        torch.testing.assert_close(freq, want, atol=4e-3, rtol=0)


def test_gaussian_forward_argmax_has_categorical_marginal():
    K, n, g = 6, 100000, torch.Generator().manual_seed(1)
    a_tilde = torch.full((n,), 0.8, dtype=torch.float64)
    z = udlm.q_wt_gaussian(torch.zeros(n, 1, dtype=torch.long), a_tilde, K, g).argmax(-1)
    alpha = udlm.gaussian_to_uniform(torch.tensor(0.8, dtype=torch.float64), K).item()
    assert (z == 0).double().mean().item() == pytest.approx(alpha + (1 - alpha) / K, abs=5e-3)


# ---- posterior, Eq. (2) ----

def bayes_posterior(x_probs, z_t, a_t, a_s, K):
    """Brute force: q(z_s | z_t, x) = sum_x w(x) q(z_s|z_t,x), w(x) ~ x_probs(x) q(z_t|x), with q(z_s|z_t,x) by
    Bayes' rule on the transition matrices q(z_s|x) = a_s I + (1-a_s)/K and q(z_t|z_s) = a_t|s I + (1-a_t|s)/K."""
    eye = torch.eye(K, dtype=torch.float64)
    Q_s = a_s * eye + (1 - a_s) / K  # [x, z_s]
    Q_ts = (a_t / a_s) * eye + (1 - a_t / a_s) / K  # [z_s, z_t]
    out = torch.zeros(K, dtype=torch.float64)
    weights = x_probs * (a_t * eye + (1 - a_t) / K)[:, z_t]  # x_theta(x) q(z_t | x)
    for x in range(K):
        joint = Q_s[x] * Q_ts[:, z_t]
        out += weights[x] / weights.sum() * joint / joint.sum()
    return out


def test_posterior_sums_to_one_and_equals_bayes_rule():
    K, g = 6, torch.Generator().manual_seed(0)
    for a_t, a_s in ((0.2, 0.5), (0.7, 0.71), (0.05, 1.0)):
        for z_t in range(K):
            one_hot = F.one_hot(torch.tensor([[2]]), K)
            q = udlm.posterior(one_hot, torch.tensor([[z_t]]), torch.tensor([a_t]), torch.tensor([a_s]))[0, 0]
            assert q.dtype == torch.float64 and q.sum().item() == pytest.approx(1.0, abs=1e-12)
            torch.testing.assert_close(q, bayes_posterior(one_hot[0, 0].double(), z_t, a_t, a_s, K))
            probs = torch.rand(K, generator=g, dtype=torch.float64).softmax(0)  # x_theta a distribution
            p = udlm.posterior(probs[None, None], torch.tensor([[z_t]]), torch.tensor([a_t]), torch.tensor([a_s]))
            torch.testing.assert_close(p[0, 0], bayes_posterior(probs, z_t, a_t, a_s, K))


def test_sampler_step_draws_from_the_posterior():
    K, n, g = 5, 200000, torch.Generator().manual_seed(0)
    logits = torch.tensor([[[0.5, -1.0, 2.0, 0.0, 1.0]]])
    for z_t, a_t, a_s in ((2, 0.3, 0.6), (4, 0.01, 0.02), (0, 0.5, 1.0)):
        want = udlm.posterior(logits.softmax(-1), torch.tensor([[z_t]]), torch.tensor([a_t]), torch.tensor([a_s]))
        z = udlm.sample_posterior(logits.expand(1, n, K), torch.full((1, n), z_t), a_t, a_s, g)
        freq = torch.bincount(z.ravel(), minlength=K).double() / n
        torch.testing.assert_close(freq, want[0, 0], atol=4e-3, rtol=0)


# ---- NELBO, Eq. (3) ----

def explicit_integrand(logits, x, z, alpha, dalpha):
    """UDLM's form summed over the vocabulary (float64): alpha'/(K alpha) [K/xb_z - K/X_z - sum_j xb_j/xb_z
    log(X_z xb_j / (X_j xb_z))]."""
    K = logits.shape[-1]
    a, da = alpha.double()[:, None, None], dalpha.double()[:, None, None]
    xbar = K * a * F.one_hot(x, K).double() + (1 - a)
    X = K * a * logits.double().softmax(-1) + (1 - a)
    xb_z, X_z = xbar.gather(-1, z[..., None]), X.gather(-1, z[..., None])
    s = (xbar / xb_z * torch.log(X_z * xbar / (X * xb_z))).sum(-1, keepdim=True)
    return (da / (K * a) * (K / xb_z - K / X_z - s))[..., 0]


def random_batch(K=7, B=6, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, K, (B, L), generator=g)
    t = torch.rand(B, generator=g) * 0.998 + 1e-3
    alpha, dalpha = udlm.alpha_loglinear(t)
    return x, udlm.q_xt(x, alpha, K, g), t, alpha, dalpha, g


def test_nelbo_closed_form_and_its_gradient_match_the_explicit_sum():
    K = 7
    x, z, t, alpha, dalpha, g = random_batch(K)
    logits = (3 * torch.randn(*x.shape, K, generator=g)).requires_grad_()
    w = torch.randn(x.shape, generator=g)
    f = udlm.nelbo_integrand(logits, x, z, alpha, dalpha)
    (grad,) = torch.autograd.grad((f * w).sum(), logits)
    f_ref = explicit_integrand(logits, x, z, alpha, dalpha)
    (grad_ref,) = torch.autograd.grad((f_ref * w).sum(), logits)
    torch.testing.assert_close(f.double(), f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=1e-4, atol=1e-5)
    assert (z == x).any() and (z != x).any()  # both branches of the closed form were exercised


def test_nelbo_integrand_is_nonnegative_and_zero_for_a_perfect_denoiser():
    K = 11
    x, z, t, alpha, dalpha, g = random_batch(K, B=16, L=32, seed=1)
    f = udlm.nelbo_integrand(torch.randn(*x.shape, K, generator=g) * 5, x, z, alpha, dalpha)
    assert f.min() >= -1e-5
    oracle = 60.0 * F.one_hot(x, K).float()  # x_theta = x up to e^-60
    assert udlm.nelbo_integrand(oracle, x, z, alpha, dalpha).abs().max() < 1e-4


def test_nelbo_equals_the_dt_to_zero_limit_of_the_discrete_kl():
    K = 6
    x, z, t, _, _, g = random_batch(K, B=4, L=6, seed=2)
    t = t.double()
    alpha, dalpha = udlm.alpha_loglinear(t)
    logits = torch.randn(*x.shape, K, generator=g, dtype=torch.float64)
    f = udlm.nelbo_integrand(logits, x, z, alpha, dalpha).double()
    dt = 1e-6
    alpha_s = udlm.alpha_loglinear(t - dt)[0]
    q = udlm.posterior(F.one_hot(x, K), z, alpha, alpha_s)
    p = udlm.posterior(logits.softmax(-1), z, alpha, alpha_s)
    kl_rate = (q * (q.log() - p.log())).sum(-1) / dt
    torch.testing.assert_close(f, kl_rate, rtol=1e-4, atol=1e-4)


def test_nelbo_monte_carlo_mean_at_initialisation_is_ln_K():
    K, B, L = 64, 4096, 16
    g = torch.Generator().manual_seed(0)
    model = udlm.DiT(K, D=16, C=16, n_blocks=1, n_heads=2)
    x = torch.randint(0, K, (B, L), generator=g)
    t = udlm.sample_t(B, g)
    alpha, dalpha = udlm.alpha_loglinear(t)
    z = udlm.q_xt(x, alpha, K, g)
    with torch.no_grad():
        logits = model(z, -torch.log(alpha))
    assert logits.abs().max() == 0  # zero-initialised output layer: x_theta uniform
    nelbo = udlm.nelbo_integrand(logits, x, z, alpha, dalpha).mean().item()
    assert nelbo == pytest.approx(math.log(K), rel=0.01)


# ---- DiT ----

def test_dit_parameter_counts_match_table_1():
    # duo-spec 4.5: tiny 23.66M, small 139.29M at K = 30522 (bert); formula below is the same count.
    for (D, n_blocks, n_heads), want in (((256, 8, 8), 23.66e6), ((768, 12, 12), 139.29e6)):
        model = udlm.DiT(30522, D, 128, n_blocks, n_heads)
        n = sum(p.numel() for p in model.parameters())
        K, C = 30522, 128
        formula = K * D + (256 * C + C + C * C + C) + n_blocks * (2 * D + 4 * D * D + 8 * D * D + 5 * D + 6 * C * D + 6 * D) \
            + (D + D * K + K + 2 * C * D + 2 * D)
        assert n == formula and n == pytest.approx(want, abs=0.006e6)


def test_dit_accepts_soft_inputs_equal_to_one_hot_lookup():
    K, g = 50, torch.Generator().manual_seed(0)
    model = udlm.DiT(K, D=16, C=16, n_blocks=2, n_heads=2, dropout=0.0).eval()
    for p in model.parameters():  # leave the zero initialisation so the output depends on the input
        torch.nn.init.normal_(p, std=0.2, generator=g)
    z, sigma = torch.randint(0, K, (2, 7), generator=g), torch.tensor([0.3, 2.0])
    torch.testing.assert_close(model(z, sigma), model(F.one_hot(z, K).float(), sigma), rtol=1e-5, atol=1e-5)


# ---- sampler and metrics ----

class Oracle(torch.nn.Module):
    """A denoiser that knows the clean rows: logits 40 * onehot(x). (For recovery sanity checks.)"""

    def __init__(self, x, K):
        super().__init__()
        self.x, self.K, self.w = x, K, torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, sigma):
        return 40.0 * F.one_hot(self.x, self.K).float()


class Uniform(torch.nn.Module):
    def __init__(self, K):
        super().__init__()
        self.K, self.w = K, torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, sigma):
        return torch.zeros(*z.shape, self.K)


def test_sampler_shapes_range_and_seed_reproducibility():
    K = 40
    model = udlm.DiT(K, D=16, C=16, n_blocks=1, n_heads=2).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(0))

    def run(seed, final="ancestral"):
        g = torch.Generator().manual_seed(seed)
        return udlm.sample(model, udlm.uniform_prior(3, 10, K, g), 1.0, steps=20, final=final, generator=g)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 10) and a.dtype == torch.long and a.min() >= 0 and a.max() < K
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(5, "greedy"), run(5, "greedy"))


def test_oracle_denoiser_recovers_everything_and_uniform_one_is_at_chance():
    K, g = 50, torch.Generator().manual_seed(0)
    x = torch.randint(0, K, (64, 32), generator=g)
    for t in (0.25, 1.0):
        r = udlm.recovery_experiment(Oracle(x, K), x, t, steps=40, generator=g, batch=64)
        m = udlm.recovery_rate(*(torch.from_numpy(r[k]) for k in ("x", "z_t", "x_hat")))
        assert m["recovery"] == 1.0 and m["unstable"] == 0.0 and m["exact"] == 1.0
    r = udlm.recovery_experiment(Uniform(K), x, 1.0, steps=40, generator=g, batch=64)
    m = udlm.recovery_rate(*(torch.from_numpy(r[k]) for k in ("x", "z_t", "x_hat")))
    assert abs(m["recovery"] - 1 / K) < 0.01
    assert r["entropy"].mean() == pytest.approx(math.log(K), rel=1e-5)


def test_recovery_entropy_is_eq12_at_the_perturbation_time():
    K, g = 40, torch.Generator().manual_seed(0)
    model = udlm.DiT(K, D=16, C=16, n_blocks=1, n_heads=2).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, K, (5, 12), generator=g)
    r = udlm.recovery_experiment(model, x, 0.25, steps=16, generator=g, batch=2)
    H = udlm.conditional_entropy(udlm.denoise(model, torch.from_numpy(r["z_t"]), 0.25))
    assert r["entropy"].shape == (5, 12) and H.std() > 1e-3  # entropies differ per token, by far more than atol
    assert torch.allclose(torch.from_numpy(r["entropy"]), H, atol=1e-5)


def test_recovery_rate_counts_only_perturbed_positions():
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    z = torch.tensor([[9, 2, 9, 4], [5, 6, 7, 8]])  # row 0: positions 0 and 2 perturbed; row 1: none
    x_hat = torch.tensor([[1, 0, 0, 4], [5, 6, 7, 8]])  # recovers position 0, not 2; breaks unperturbed 1
    m = udlm.recovery_rate(x, z, x_hat)
    assert m["recovery"] == 0.5 and m["unstable"] == pytest.approx(1 / 6) and m["exact"] == 0.5


def test_conditional_entropy_closed_forms():
    K = 8
    logits = torch.zeros(1, 2, K)
    logits[0, 1, 3] = 1e4  # a point mass
    H = udlm.conditional_entropy(logits)
    assert H[0, 0].item() == pytest.approx(math.log(K)) and H[0, 1].item() == pytest.approx(0.0, abs=1e-6)
