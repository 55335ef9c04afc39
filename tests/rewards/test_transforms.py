"""Transforms Phi of a calibrated reward (algorithms.md §3), checked against independent values:
numbers worked out by hand with the math module, calculus identities, and the exact KL / mean of
the tilted policies that algorithms.md §4 gives in closed form (integrated here with numpy's
Gauss-Legendre nodes, not with the package's own quadrature)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iapo_jax.rewards import (
    DEFAULT_EPS,
    TRANSFORMS,
    available_transforms,
    calibrated_transform,
    get_transform,
)

# (transform, t, u, Phi(u)) worked out by hand
HAND_VALUES = [
    ("identity", None, 0.0, 0.0), ("identity", None, 0.25, 0.25), ("identity", None, 1.0, 1.0),
    ("log", None, 0.5, -math.log(2)), ("log", None, 0.25, -2 * math.log(2)), ("log", None, 1.0, math.log(1 - DEFAULT_EPS)),
    ("log", None, 0.0, math.log(DEFAULT_EPS)),
    ("logit", None, 0.5, 0.0), ("logit", None, 0.75, math.log(3)), ("logit", None, 0.2, -math.log(4)),
    ("exp", 2.0, 0.0, 1.0), ("exp", 2.0, 0.5, math.e), ("exp", 3.0, 1.0, math.e**3),
    ("exp", 1.0, math.log(2), 2.0),
    ("negexp", 2.0, 0.0, -1.0), ("negexp", 2.0, 0.5, -1 / math.e), ("negexp", 7.5, 1.0, -math.exp(-7.5)),
    ("negexp", 4.0, math.log(2) / 4, -0.5),
]


@pytest.mark.parametrize("name,t,u,want", HAND_VALUES)
def test_values_worked_out_by_hand(name, t, u, want):
    got = get_transform(name, t=t)(np.float32(u))
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(want, rel=2e-6, abs=1e-6)


@pytest.mark.parametrize("name,t", [("identity", None), ("log", None), ("logit", None), ("exp", 3.0),
                                    ("negexp", 7.5)])
def test_strictly_increasing_and_finite(name, t):
    """Strictly increasing on the unclipped interior, so win rates are preserved (§2)."""
    phi = get_transform(name, t=t)
    interior = np.asarray(phi(np.linspace(0.01, 0.99, 99, dtype=np.float32)))
    assert np.all(np.isfinite(interior)) and np.all(np.diff(interior) > 0)
    assert np.all(np.isfinite(np.asarray(phi(np.array([0.0, 1.0], np.float32)))))  # clipped ends


@pytest.mark.parametrize("u", [0.1, 0.3, 0.5, 0.8])
def test_derivatives_follow_the_calculus_rules(u):
    """d/du log u = 1/u; d/du logit u = 1/(u(1-u)); d/du e^(tu) = t e^(tu); d/du -e^(-tu) = t e^(-tu)."""
    grad = lambda name, t=None: float(jax.grad(lambda x: get_transform(name, t=t)(x))(jnp.float32(u)))  # noqa: E731
    assert grad("identity") == pytest.approx(1.0, rel=1e-6)
    assert grad("log") == pytest.approx(1 / u, rel=1e-5)
    assert grad("logit") == pytest.approx(1 / (u * (1 - u)), rel=1e-5)
    assert grad("exp", 2.5) == pytest.approx(2.5 * math.exp(2.5 * u), rel=1e-5)
    assert grad("negexp", 2.5) == pytest.approx(2.5 * math.exp(-2.5 * u), rel=1e-5)


def test_logit_is_odd_about_one_half_and_negexp_is_minus_the_reciprocal_of_exp():
    u = np.linspace(0.05, 0.95, 19, dtype=np.float32)
    logit = get_transform("logit")
    np.testing.assert_allclose(np.asarray(logit(u)), -np.asarray(logit(1 - u)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(get_transform("negexp", t=3.0)(u)),
                               -1.0 / np.asarray(get_transform("exp", t=3.0)(u)), rtol=2e-6, atol=1e-7)


def _tilt(phi, beta, nodes=200):
    """Density f = exp(Phi/beta)/Z of the KL-optimal policy on [0, 1] at Gauss-Legendre nodes."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    u, w = (x + 1) / 2, w / 2
    logits = np.asarray(phi(u.astype(np.float32)), np.float64) / beta
    logits -= logits.max()
    f = np.exp(logits) / np.sum(w * np.exp(logits))
    return u, w, f


@pytest.mark.parametrize("a", [1.0, 3.0, 7.0])
def test_log_transform_tilt_is_the_best_of_n_policy_with_its_exact_kl(a):
    """§4: with Phi = log u and beta = 1/a the tilt is f = (a+1) u^a, whose KL is
    log(a+1) - a/(a+1) and whose standard win rate is (a+1)/(a+2)."""
    u, w, f = _tilt(get_transform("log", eps=1e-9), 1.0 / a)
    np.testing.assert_allclose(f, (a + 1) * u**a, rtol=1e-4, atol=1e-6)
    assert np.sum(w * f * np.log(f)) == pytest.approx(math.log(a + 1) - a / (a + 1), abs=1e-5)
    assert np.sum(w * u * f) == pytest.approx((a + 1) / (a + 2), abs=1e-5)


@pytest.mark.parametrize("lam", [0.5, 2.0, 8.0])
def test_identity_transform_tilt_has_the_exponential_density_mean_and_kl(lam):
    """§4: Phi = u, beta = 1/lam: f = lam e^(lam u)/(e^lam - 1), E[u] = 1/(1 - e^-lam) - 1/lam, and
    (log f being linear in u) KL = log(lam/(e^lam - 1)) + lam E[u]."""
    u, w, f = _tilt(get_transform("identity"), 1.0 / lam)
    mean = 1 / (1 - math.exp(-lam)) - 1 / lam
    assert np.sum(w * u * f) == pytest.approx(mean, abs=1e-6)
    assert np.sum(w * f * np.log(f)) == pytest.approx(math.log(lam / math.expm1(lam)) + lam * mean, abs=1e-6)


def test_exp_transform_tilt_at_small_t_is_the_identity_tilt():
    """e^(tu)/beta = 1/beta + (t/beta) u + O(t^2): with beta = t/lam and t -> 0 the exp tilt tends
    to the identity tilt of rate lam; the extra (lam t / 2) u^2 in the exponent moves the mean by
    O(lam t), well under 1e-2 at t = 1e-2, and upwards."""
    lam, t = 2.0, 1e-2
    u, w, f = _tilt(get_transform("exp", t=t), t / lam)
    mean = 1 / (1 - math.exp(-lam)) - 1 / lam
    assert np.sum(w * u * f) == pytest.approx(mean, abs=1e-2)
    assert np.sum(w * u * f) > mean  # the curvature of e^(tu) tilts further up, not down


def test_registry_lists_all_six():
    assert available_transforms() == ["exp", "identity", "log", "logit", "negexp", "optimal"]
    assert set(TRANSFORMS) == set(available_transforms())


def test_log_and_logit_clip_to_eps():
    eps = 0.01
    assert float(get_transform("log", eps=eps)(0.0)) == pytest.approx(math.log(0.01), rel=1e-6)
    assert float(get_transform("logit", eps=eps)(1.0)) == pytest.approx(math.log(99), rel=1e-6)
    assert float(get_transform("logit", eps=eps)(0.0)) == pytest.approx(-math.log(99), rel=1e-6)


def test_t_is_traceable_without_recompiling():
    # The raw registry functions take t as an argument, so sweeps over t reuse one compilation.
    traces = []

    def f(u, t):
        traces.append(1)
        return TRANSFORMS.get("exp").fn(u, t)

    jitted = jax.jit(f)
    for t, want in ((1.0, math.exp(0.5)), (2.0, math.e), (5.0, math.exp(2.5))):
        assert float(jitted(np.float32(0.5), np.float32(t))) == pytest.approx(want, rel=2e-6)
    assert len(traces) == 1


def test_calibrated_transform_on_a_pool_worked_out_by_hand():
    """Pool (sorted) [1, 2, 2, 4], m = 4: C_hat = (#below + #equal/2) / 4 gives, for the scores
    0.5, 1, 2, 3, 4, 9, the mid-ranks 0, 1/8, 1/2, 3/4, 7/8, 1. log clips at 1/(2m) = 1/8."""
    pool = np.array([[1.0, 2.0, 2.0, 4.0]], np.float32)
    scores = np.array([[0.5, 1.0, 2.0, 3.0, 4.0, 9.0]], np.float32)
    c = [0.0, 0.125, 0.5, 0.75, 0.875, 1.0]
    want = {
        "identity": c,
        "log": [math.log(0.125), math.log(0.125), math.log(0.5), math.log(0.75), math.log(0.875), math.log(0.875)],
        "exp": [math.exp(2 * v) for v in c],
        "negexp": [-math.exp(-2 * v) for v in c],
    }
    for name, values in want.items():
        fn = calibrated_transform(name, t=2.0 if "exp" in name else None)
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(scores, pool))[0], values, rtol=2e-6, atol=1e-7,
                                   err_msg=name)
    explicit = np.asarray(calibrated_transform("log", eps=0.001)(scores, pool))
    assert explicit[0, 0] == pytest.approx(math.log(0.001), rel=1e-6)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("exp", {}, "needs a parameter t > 0"),
        ("negexp", {"t": 0.0}, "finite t > 0"),
        ("exp", {"t": -1.0}, "finite t > 0"),
        ("exp", {"t": float("nan")}, "finite t > 0"),
        ("exp", {"t": float("inf")}, "finite t > 0"),
        ("exp", {"t": True}, "finite t > 0"),
        ("identity", {"t": 2.0}, "takes no parameter t"),
        ("log", {"eps": 0.0}, r"eps must be a number in \(0, 0.5\)"),
        ("logit", {"eps": 0.7}, r"eps must be a number in \(0, 0.5\)"),
        ("softmax", {}, "unknown transform 'softmax'; available transforms: exp, identity"),
    ],
)
def test_bad_parameters_raise(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_transform(name, **kwargs)
    with pytest.raises(ValueError, match=message):
        calibrated_transform(name, **kwargs)
