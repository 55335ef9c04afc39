"""Transforms Phi of a calibrated reward (algorithms.md §3), checked against numpy closed forms."""

import jax
import numpy as np
import pytest

from iapo_jax.rewards import (
    DEFAULT_EPS,
    TRANSFORMS,
    available_transforms,
    calibrate,
    calibrated_transform,
    get_transform,
)

U = np.array([0.0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0], np.float32)


def _closed_form(name, u, t, eps):
    u = u.astype(np.float64)
    clipped = np.clip(u, eps, 1 - eps)
    return {
        "identity": u,
        "log": np.log(clipped),
        "logit": np.log(clipped / (1 - clipped)),
        "exp": np.exp(t * u) if t else None,
        "negexp": -np.exp(-t * u) if t else None,
    }[name]


@pytest.mark.parametrize(
    "name, t", [("identity", None), ("log", None), ("logit", None), ("exp", 3.0), ("negexp", 7.5)]
)
def test_values_match_closed_forms(name, t):
    phi = get_transform(name, t=t)
    got = np.asarray(phi(U))
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _closed_form(name, U, t, DEFAULT_EPS), rtol=2e-6, atol=1e-6)
    # Strictly increasing on the unclipped interior, so win rates are preserved.
    interior = np.linspace(0.01, 0.99, 99, dtype=np.float32)
    assert np.all(np.diff(np.asarray(phi(interior))) > 0)


def test_registry_lists_all_five():
    assert available_transforms() == ["exp", "identity", "log", "logit", "negexp"]
    assert set(TRANSFORMS) == set(available_transforms())


def test_log_and_logit_clip_to_eps():
    eps = 0.01
    assert float(get_transform("log", eps=eps)(0.0)) == pytest.approx(np.log(eps), rel=1e-6)
    assert float(get_transform("logit", eps=eps)(1.0)) == pytest.approx(np.log((1 - eps) / eps), rel=1e-6)
    assert float(get_transform("logit", eps=eps)(0.0)) == pytest.approx(-np.log((1 - eps) / eps), rel=1e-6)


def test_t_is_traceable_without_recompiling():
    # The raw registry functions take t as an argument, so sweeps over t reuse one compilation.
    traces = []

    def f(u, t):
        traces.append(1)
        return TRANSFORMS["exp"].fn(u, t)

    jitted = jax.jit(f)
    for t in (1.0, 2.0, 5.0):
        np.testing.assert_allclose(jitted(U, np.float32(t)), np.exp(t * U.astype(np.float64)), rtol=2e-6)
    assert len(traces) == 1


def test_calibrated_transform_composes_and_uses_pool_resolution():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(3, 10)).astype(np.float32)
    scores = np.concatenate([pool[:, :2], [[-9.0], [-9.0], [9.0]]], axis=1).astype(np.float32)
    pool = np.sort(pool, axis=-1)  # calibrated_transform expects sorted rows, as ReferencePool keeps them
    for name, t in [("identity", None), ("log", None), ("logit", None), ("exp", 4.0), ("negexp", 4.0)]:
        fn = calibrated_transform(name, t=t)
        want = get_transform(name, t=t, eps=1 / (2 * 10))(calibrate(scores, pool))
        np.testing.assert_allclose(jax.jit(fn)(scores, pool), want, rtol=1e-6)
    # A score below the whole pool has C_hat = 0; log clips it at 1/(2m) rather than -inf.
    logged = np.asarray(calibrated_transform("log")(scores, pool))
    assert logged[0, 2] == pytest.approx(np.log(1 / 20), rel=1e-6)
    explicit = np.asarray(calibrated_transform("log", eps=0.001)(scores, pool))
    assert explicit[0, 2] == pytest.approx(np.log(0.001), rel=1e-6)


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
