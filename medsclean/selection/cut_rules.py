"""Rules that choose the final cut tau on one class's image scores eta.

Pure NumPy (SciPy for one root). Scores are "higher = more anomalous"; an image is kept
when eta < tau (strict, as in selection.py), so an image scoring exactly tau is rejected.

cut_mad, cut_otsu and cut_mixture never put tau at or below the class median (tau >= the
next float above it): every image scoring at most the median is kept, so at most half the
class is rejected, and a class whose scores are all equal keeps every image (unlike
selection.threshold, which keeps none). cut_fraction rejects the count asked for instead.
Every rule raises MedscleanError on NaN or infinite scores and ValueError on none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq

from medsclean.errors import MedscleanError
from medsclean.selection.progressive import threshold

RULES = ("mixture", "mad", "otsu")

_EM_ITERATIONS = 200
_EM_TOLERANCE = 1e-8  # on the mean log-likelihood per image
_VAR_FLOOR = 1e-6  # component variances stay above this share of the data's variance


def _validated(scores: ArrayLike) -> np.ndarray:
    """(n,) float64 copy of the scores; ValueError when empty, MedscleanError when not finite."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, not shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise MedscleanError(
            "selection scores contain NaN or infinity: the model diverged; lower the learning rate and rerun"
        )
    return x


def _above(value: float) -> float:
    """The next float above value: the smallest tau that keeps an image scoring value."""
    return float(np.nextafter(value, np.inf))


def _floored(tau: float, x: np.ndarray) -> float:
    """tau raised, when needed, to just above the median of x (n,)."""
    return max(float(tau), _above(float(np.median(x))))


def cut_mad(scores: ArrayLike, k: float = 3.0) -> float:
    """tau = median + k * MAD (unscaled MAD, as selection.py) of scores (n,).

    Floored just above the median, so MAD = 0 (e.g. all scores equal) keeps the median's ties.
    """
    x = _validated(scores)
    return _floored(threshold(x, 1, 1, k), x)  # Step 3's rule at its last iteration, t = T


def cut_fraction(scores: ArrayLike, fraction: float) -> float:
    """tau rejecting the m = floor(fraction * n + 1/2) highest of scores (n,) (halves round up).

    Ties at the boundary are kept together: every image scoring the same as the highest kept
    image is kept, so fewer than m are rejected when ties straddle the boundary (an all-equal
    class keeps everything unless m = n). tau lies midway between the highest kept score and
    the lowest rejected one; m = 0 gives the next float above the maximum, m = n the minimum.
    """
    x = _validated(scores)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), not {fraction}")
    s = np.sort(x)
    n, m = s.size, int(np.floor(fraction * s.size + 0.5))
    if m == 0:
        return _above(s[-1])
    if m >= n:
        return float(s[0])
    kept_max = s[n - m - 1]
    rejected = s[s > kept_max]
    if rejected.size == 0:
        return _above(kept_max)
    tau = kept_max / 2 + rejected[0] / 2
    return float(tau) if tau > kept_max else _above(kept_max)


def _otsu_edge(x: np.ndarray, bins: int) -> float:
    """Upper edge of the lower class's last bin in Otsu's split of x (n,), min(x) < max(x)."""
    counts, edges = np.histogram(x, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0, w1 = np.cumsum(counts)[:-1], np.cumsum(counts[::-1])[::-1][1:]
    s0, s1 = np.cumsum(counts * centers)[:-1], np.cumsum((counts * centers)[::-1])[::-1][1:]
    between = w0 * w1 * (s0 / w0 - s1 / w1) ** 2  # w0 >= 1 (min) and w1 >= 1 (max)
    return float(edges[int(np.argmax(between)) + 1])


def cut_otsu(scores: ArrayLike, bins: int = 64) -> float:
    """Otsu's cut of scores (n,): maximise the between-class variance over `bins` histogram bins.

    tau is the upper edge of the lower class's last bin (skimage's threshold_otsu returns that
    bin's centre, half a bin lower), floored just above the median: Otsu always splits a class
    in two, so on a clean class the floor still rejects up to half of it.
    """
    x = _validated(scores)
    if bins < 2:
        raise ValueError(f"bins must be >= 2, not {bins}")
    if x.min() == x.max():
        return _above(x[0])
    return _floored(_otsu_edge(x, bins), x)


def _log_transform(x: np.ndarray) -> tuple[np.ndarray, Callable[[float], float]]:
    """y = log(x - min + (median - min)) for x (n,), and its inverse.

    The offset (median - min) beat 0.1x, 0.3x and 3x it on the synthetic sets of the tests.
    """
    lo = float(x.min())
    offset = max(float(np.median(x)) - lo, 1e-3 * (float(x.max()) - lo))
    return np.log(x - lo + offset), lambda y: float(np.exp(y)) + lo - offset


def _em(y: np.ndarray, high: np.ndarray, var_floor: float) -> tuple | None:
    """EM from the hard split `high` (n,) bool; (weights, means, sigmas) (2,) each, mean log-lik."""
    resp, previous = high.astype(np.float64), -np.inf
    for _ in range(_EM_ITERATIONS):
        nk = np.array([resp.size - resp.sum(), resp.sum()])
        if nk.min() < 1e-3:
            return None  # one component died: the data look like a single Gaussian
        r = np.stack([1.0 - resp, resp], axis=1)  # (n, 2)
        mu = (r * y[:, None]).sum(axis=0) / nk
        var = np.maximum((r * (y[:, None] - mu) ** 2).sum(axis=0) / nk, var_floor)
        w = nk / resp.size
        logp = np.log(w) - 0.5 * np.log(2 * np.pi * var) - (y[:, None] - mu) ** 2 / (2 * var)
        norm = np.logaddexp(logp[:, 0], logp[:, 1])
        resp, loglik = np.exp(logp[:, 1] - norm), float(norm.mean())
        if loglik - previous < _EM_TOLERANCE:
            break
        previous = loglik
    order = np.argsort(mu)
    return w[order], mu[order], np.sqrt(var[order]), loglik


def _fit_two_gaussians(y: np.ndarray) -> tuple | None:
    """Two-component Gaussian mixture on y (n,) by EM, best of three deterministic starts.

    Starts split y at Otsu's cut, the median and the 90th percentile. Returns (weights, means,
    sigmas), each (2,) with means ascending, and the mean log-likelihood; None when every start
    collapses to one component. Needs min(y) < max(y).
    """
    var_floor = _VAR_FLOOR * float(np.var(y))
    splits = (_otsu_edge(y, 64), float(np.median(y)), float(np.quantile(y, 0.9)))
    fits = [_em(y, y >= s, var_floor) for s in splits if 0 < np.count_nonzero(y >= s) < y.size]
    fits = [f for f in fits if f is not None]
    return max(fits, key=lambda f: f[3]) if fits else None


def _posterior_crossing(fit: tuple, min_separation: float, max_weight: float) -> float | None:
    """Point between the means where the high component's posterior is 0.5, if the fit passes.

    The fit passes when the high weight <= max_weight and Ashman's D = sqrt(2)|mu1 - mu0| /
    sqrt(s0^2 + s1^2) >= min_separation, and the posterior crosses 0.5 between the means.
    """
    w, mu, sd, _ = fit
    if w[1] > max_weight or np.sqrt(2) * (mu[1] - mu[0]) / np.hypot(sd[0], sd[1]) < min_separation:
        return None

    def log_ratio(t: float) -> float:
        z = (t - mu) / sd
        return float(np.log(w[1] / sd[1]) - z[1] ** 2 / 2 - np.log(w[0] / sd[0]) + z[0] ** 2 / 2)

    if log_ratio(mu[0]) >= 0 or log_ratio(mu[1]) <= 0:
        return None
    return float(brentq(log_ratio, mu[0], mu[1], xtol=1e-12 * (1 + abs(mu[1]))))


MIXTURE_MIN_IMAGES = 20
"""Classes smaller than this use cut_mad instead of the mixture. Measured without it (400 draws per
size of clean normal, log-normal and gamma scores): the separation test alone let the fit reject
more than cut_mad in 1-11 % of draws of 5-15 images, and on clean classes of 10 images chance fits
reached a likelihood ratio of 27, above MIN_LIKELIHOOD_RATIO; from 15 images on they stayed under it."""
MIN_LIKELIHOOD_RATIO = 25.0
"""The two-component fit must beat one Gaussian by this likelihood-ratio statistic 2n(l2 - l1)
(l: mean log-likelihood per image on the fitted scale). Measured on clean normal, log-normal and
gamma classes of 20-200 images (150 draws per size): no fit that passed the separation test
reached 22.3, while the separation test alone over-rejected in 0.5-7 % of draws of 20-100 images.
Contaminated classes of the tests' families: 61 and more at 5 % of 210 images, 14-29 with
1-13 contaminants among 20 normals (those fall back to cut_mad)."""


def mixture_decision(
    scores: ArrayLike, *, k_fallback: float = 3.0, min_separation: float = 3.0,
    max_weight: float = 0.5, log: bool = True, min_images: int = MIXTURE_MIN_IMAGES,
    min_likelihood_ratio: float = MIN_LIKELIHOOD_RATIO,
) -> tuple[float, dict]:
    """cut_mixture's tau of scores (n,) and the rule it actually used, with the reason.

    Returns:
        tau: float.
        used: {"rule": "mixture" or "mad", "why": one line}; for "mixture" also the fit's
            likelihood ratio, Ashman's D and high-component weight.
    """
    x = _validated(scores)
    if x.size < min_images:
        return cut_mad(x, k_fallback), {"rule": "mad", "why": f"{x.size} images, fewer than the {min_images} a "
                                        f"two-component fit needs"}
    if x.min() == x.max():
        return cut_mad(x, k_fallback), {"rule": "mad", "why": "all scores equal"}
    y, back = _log_transform(x) if log else (x, float)
    fit = _fit_two_gaussians(y)
    if fit is None:
        return cut_mad(x, k_fallback), {"rule": "mad", "why": "the fit collapsed to one component"}
    w, mu, sd, loglik = fit
    one = -0.5 * np.log(2 * np.pi * max(float(np.var(y)), 1e-300)) - 0.5  # one Gaussian's mean log-likelihood
    ratio = 2.0 * x.size * (loglik - one)
    separation = float(np.sqrt(2) * (mu[1] - mu[0]) / np.hypot(sd[0], sd[1]))
    facts = {"likelihood_ratio": round(float(ratio), 3), "separation": round(separation, 3),
             "high_weight": round(float(w[1]), 4)}
    if ratio < min_likelihood_ratio:
        why = f"two components fit no better than one (likelihood ratio {ratio:.1f} < {min_likelihood_ratio:g})"
        return cut_mad(x, k_fallback), {"rule": "mad", "why": why, **facts}
    cut = _posterior_crossing(fit, min_separation, max_weight)
    if cut is None:
        why = (f"the components are not separated (Ashman's D {separation:.2f}, needs {min_separation:g}; "
               f"high weight {w[1]:.2f}, at most {max_weight:g})")
        return cut_mad(x, k_fallback), {"rule": "mad", "why": why, **facts}
    return _floored(back(cut), x), {"rule": "mixture", "why": f"two separated components (likelihood ratio "
                                    f"{ratio:.1f}, Ashman's D {separation:.2f})", **facts}


def cut_mixture(
    scores: ArrayLike, *, k_fallback: float = 3.0, min_separation: float = 3.0,
    max_weight: float = 0.5, log: bool = True, min_images: int = MIXTURE_MIN_IMAGES,
    min_likelihood_ratio: float = MIN_LIKELIHOOD_RATIO,
) -> float:
    """Cut of scores (n,) where a two-Gaussian mixture's high component takes over.

    The mixture is fitted by EM on log(eta - min + (median - min)) when `log` (anomaly scores
    are right-skewed), else on eta. A clean class has no second component, so the fit is used
    only when the class has at least `min_images` images, the fit beats one Gaussian by a
    likelihood-ratio statistic of at least `min_likelihood_ratio`, the high weight <= max_weight
    and Ashman's D >= min_separation; otherwise tau = cut_mad(scores, k_fallback)
    (:func:`mixture_decision` says which and why). tau is floored just above the median.
    Measured on synthetic classes: log=True halves the mixture's false rejections at 5-10 %
    contamination; min_separation 3 (not Ashman's usual 2) keeps a clean class of 100-200
    images at cut_mad's rejection rate, where 2 accepted chance splits rejecting up to half.
    Without the size floor and the likelihood ratio, clean classes of 5-100 images were cut
    harder than by cut_mad in up to 11 % of draws.
    """
    return mixture_decision(scores, k_fallback=k_fallback, min_separation=min_separation, max_weight=max_weight,
                            log=log, min_images=min_images, min_likelihood_ratio=min_likelihood_ratio)[0]


def rules_used(scores: ArrayLike, classes: Sequence[str], rule: str, *, reject_fraction: float | None = None,
               **params: float | bool) -> dict[str, dict]:
    """Per class, the rule :func:`cut_per_class` applies to scores (N,) and why: the mixture
    falls back to mad on some classes (:func:`mixture_decision`); other rules are themselves."""
    x = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(classes, dtype=object)
    used: dict[str, dict] = {}
    for name in sorted(set(labels.tolist())):
        if reject_fraction is not None:
            used[name] = {"rule": f"top {reject_fraction:g}", "why": "a fixed share was asked for"}
        elif rule == "mixture":
            used[name] = mixture_decision(x[labels == name], **params)[1]
        else:
            used[name] = {"rule": rule, "why": "the rule asked for"}
    return used


_CUTS: dict[str, Callable[..., float]] = {"mixture": cut_mixture, "mad": cut_mad, "otsu": cut_otsu}


def _rule(rule: str) -> Callable[..., float]:
    if rule not in _CUTS:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    return _CUTS[rule]


def cut_per_class(
    scores: ArrayLike, classes: Sequence[str], rule: str, *,
    reject_fraction: float | None = None, **params: float | bool,
) -> tuple[np.ndarray, dict[str, float]]:
    """Cut each class on its own, keeping the images strictly below their class's tau.

    Args:
        scores: (N,) image scores.
        classes: N class names, one per image.
        rule: one of RULES; params are passed on to it.
        reject_fraction: when given, every class uses cut_fraction(..., reject_fraction) instead.

    Returns:
        keep: (N,) bool, True for images kept as clean.
        tau: threshold per class, classes in sorted order.

    Raises:
        MedscleanError: when a score is NaN or infinite (training diverged).
    """
    cut = _rule(rule)
    x = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(classes, dtype=object)
    if x.shape != (len(labels),):
        raise ValueError(f"{x.shape[0] if x.ndim else 0} scores for {len(labels)} class labels")
    if x.size:
        _validated(x)
    keep = np.zeros(x.size, dtype=bool)
    tau: dict[str, float] = {}
    for name in sorted(set(labels.tolist())):
        members = labels == name
        fixed = reject_fraction is not None
        tau[name] = cut_fraction(x[members], reject_fraction) if fixed else cut(x[members], **params)
        keep[members] = x[members] < tau[name]
    return keep, tau
