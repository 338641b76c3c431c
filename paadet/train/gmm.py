"""Batched 1-D two-component Gaussian mixture EM: scikit-learn's ``GaussianMixture`` as mmdetection calls it.

mmdetection 3.3's ``PAAHead.paa_reassign`` fits, for every ground truth with at least two candidate
anchors, ``GaussianMixture(n_components=2, weights_init=[0.5, 0.5], means_init=[[min], [max]],
precisions_init=[[1], [1]], covariance_type='diag')`` to the candidates' scores (an ``(n, 1)`` float32
array), then calls ``predict`` and ``score_samples``. :func:`fit_gmm_1d` runs that EM for G candidate
sets at once (one row each, padded to N), and :func:`gmm_positives` applies mmdetection's
``gmm_separation_scheme`` to the result.

The arithmetic mirrors scikit-learn >= 1.7 (``sklearn/mixture/_gaussian_mixture.py``, checked against
1.9.1) operation by operation, including its float32/float64 rules. (1.6.1 and older form the diag
variance as ``sum r x^2 / n_k - 2 mu (sum r x / n_k) + mu^2``: the same value, rounded differently.)

* X stays float32; ``x * x`` is formed in float32 and then upcast (E-step and M-step); the parameters
  are float64. The initial means are float32, so the first E-step squares them in float32.
* E-step: ``log N_k(x) = -0.5 * (log 2pi + (mu_k^2 lam_k - 2 x mu_k lam_k + x^2 lam_k)) + log c_k``
  with ``c_k`` the precision Cholesky and ``lam_k = c_k^2``; plus ``log w_k``; scikit-learn's
  two-term logsumexp (an exact tie gives ``max + log 2``). The lower bound is the mean of the
  logsumexp over the row's valid samples, under the parameters *before* the iteration's M-step.
* M-step: ``n_k = sum r + 10 * eps64``, ``mu_k = sum r x / n_k``, ``var_k = sum r x^2 / n_k - mu_k^2 +
  reg_covar``, ``w_k = n_k / sum n_k``, ``c_k = 1 / sqrt(var_k)``.
* A row stops at the first iteration with ``|lb - lb_prev| < tol`` (``lb_prev`` starts at -inf, so
  never before iteration 2); its parameters are then those after that iteration's M-step and stay
  frozen while other rows go on. ``predict`` is the argmax of the weighted log-probabilities (a tie
  gives component 0, as ``numpy.argmax``) and ``score_samples`` their logsumexp, both under the final
  parameters.
* Sums over samples run in index order (``cumsum``), so on CPU a row's result is bit-identical
  whatever its padding and the other rows. scikit-learn sums in BLAS's order, so the two agree to
  rounding, amplified by the diag formula's cancellation: about 1e-13 relative for most rows, up to
  about 1e-6 (and, rarely, the other labelling of two near-identical components) where a component's
  variance is down at the float32 rounding of ``x * x``; there scikit-learn disagrees with itself by
  as much when the same samples are given in another order.

Degenerate rows (deliberate, documented differences; scikit-learn raises or is never called):

* **Ill-defined covariance.** scikit-learn raises ``ValueError("... ill-defined empirical covariance
  ...")`` in the M-step when a diag variance (reg_covar included) is <= 0. That happens when a
  component collapses onto one value of magnitude above about 4: the float32 ``x * x`` then misses
  ``mu^2`` by more than reg_covar (mmdetection#4152). Such rows get ``ill_defined = True`` and, from
  that M-step on, continue as ``covariance_type='full'`` would, in float64: variances
  ``sum r (x - mu)^2 / n_k + reg_covar`` (always >= reg_covar) and log-densities from
  ``((x - mu) * c)^2``. That is the same model in exact arithmetic, what mmdetection's maintainers
  advised for this error, and it avoids the diag form's cancellation, which around a collapsed
  component is off by ``|fl32(x^2) - x^2| / var``, hundreds of nats. So the row's result is finite and
  usable; a caller that wants mmdetection's behaviour (the training step fails) can test ``ill_defined``.
* **Fewer than 2 valid samples.** scikit-learn refuses them and mmdetection skips such ground truths
  (no positive). These rows are not fitted: ``n_iter = 0``, ``converged = False``, the initial
  parameters (weights 0.5/0.5, means [min, max] of the valid samples or [0, 0] for an empty row,
  variances 1), ``assign`` and ``log_density`` evaluated under them (a lone sample gets component 0),
  and :func:`gmm_positives` gives them no positive.
* **All values identical.** Handled as scikit-learn does: both components coincide, the variances
  come out at reg_covar plus the float32 rounding of ``x * x`` (ill-defined when that is negative
  and larger than reg_covar, exactly as in scikit-learn), and every sample is assigned to component 0.

Non-finite valid samples raise :class:`GMMError` (scikit-learn's input validation refuses them too).

Shaped for a GPU: every iteration is a fixed set of tensor operations on all G rows; the host checks
whether any row is still active only every :data:`SYNC_EVERY` iterations, so one call costs at most
``ceil(max_iter / SYNC_EVERY) + 1`` host synchronisations whatever G is (plus one in
:func:`gmm_positives`, and a few more there only when exact score ties occur).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from paadet.errors import PaadetError

__all__ = ["SYNC_EVERY", "GMMError", "GMMFit", "fit_gmm_1d", "gmm_positives"]

SYNC_EVERY = 4
"""EM iterations between two host checks of "is any row still active" (speed only, exact for any value)."""

_LOG_2PI = math.log(2 * math.pi)
_LOG_2 = math.log(2.0)
_EPS64 = float(torch.finfo(torch.float64).eps)


class GMMError(PaadetError):
    """Inputs that :func:`fit_gmm_1d` cannot fit (wrong shapes or dtypes, non-finite samples)."""


@dataclass
class GMMFit:
    """The per-row result of :func:`fit_gmm_1d` (G rows of N padded samples; component 0 starts at the min).

    Attributes:
        assign: [G, N] int64, scikit-learn's ``predict``: 0 or 1; -1 where the mask is False.
        log_density: [G, N] float64, scikit-learn's ``score_samples``; -inf where the mask is False.
        means: [G, 2] float64.
        variances: [G, 2] float64 (reg_covar included).
        weights: [G, 2] float64.
        n_iter: [G] int64, scikit-learn's ``n_iter_`` (0 for rows with fewer than 2 valid samples).
        converged: [G] bool, scikit-learn's ``converged_``.
        ill_defined: [G] bool, rows where scikit-learn raises "ill-defined empirical covariance".
    """

    assign: Tensor
    log_density: Tensor
    means: Tensor
    variances: Tensor
    weights: Tensor
    n_iter: Tensor
    converged: Tensor
    ill_defined: Tensor


def _check_inputs(x: Tensor, mask: Tensor, reg_covar: float, tol: float, max_iter: int) -> None:
    if x.dim() != 2:
        raise GMMError(f"fit_gmm_1d: x must be [G, N], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise GMMError(f"fit_gmm_1d: x must be float32 (or float64), got {x.dtype}")
    if mask.shape != x.shape or mask.dtype != torch.bool:
        raise GMMError(f"fit_gmm_1d: mask must be bool of shape {tuple(x.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if mask.device != x.device:
        raise GMMError(f"fit_gmm_1d: x is on {x.device} but mask is on {mask.device}")
    if not (reg_covar >= 0.0 and tol >= 0.0 and max_iter >= 1):
        raise GMMError(f"fit_gmm_1d: need reg_covar >= 0, tol >= 0, max_iter >= 1, got {reg_covar}, {tol}, {max_iter}")


def _weighted_log_prob(
    x: Tensor, x_sq: Tensor, means: Tensor, means_sq: Tensor, prec_chol: Tensor, weights: Tensor, centred: Tensor
) -> Tensor:
    """scikit-learn's ``_estimate_weighted_log_prob``: [G, N, 2] float64 from [G, N] samples and [G, 2] params.

    Rows with ``centred`` [G] False use the diag form exactly as scikit-learn computes it: ``x`` is the
    float64 copy of the samples, ``x_sq`` the float32 square upcast, ``means_sq`` the squared means as
    scikit-learn forms them (float32 before the first M-step). Rows with ``centred`` True (ill-defined
    rows, see the module docstring) use the 'full' form ``((x - mu) * c)^2`` in float64.
    """
    prec = prec_chol * prec_chol
    diag = (
        (means_sq * prec).unsqueeze(1)
        - 2.0 * (x.unsqueeze(2) * (means * prec).unsqueeze(1))
        + x_sq.unsqueeze(2) * prec.unsqueeze(1)
    )
    full = ((x.unsqueeze(2) - means.unsqueeze(1)) * prec_chol.unsqueeze(1)).square()
    log_prob = torch.where(centred[:, None, None], full, diag)
    return (-0.5 * (_LOG_2PI + log_prob) + torch.log(prec_chol).unsqueeze(1)) + torch.log(weights).unsqueeze(1)


def _logsumexp2(wlp: Tensor) -> Tensor:
    """scikit-learn's ``_logsumexp`` over the last axis of size 2 (an exact tie gives ``max + log 2``)."""
    w0, w1 = wlp.unbind(-1)
    hi = torch.maximum(w0, w1)
    lo = torch.minimum(w0, w1)
    return torch.where(w0 == w1, _LOG_2 + hi, torch.log1p(torch.exp(lo - hi)) + hi)


def _sample_sum(t: Tensor, dim: int) -> Tensor:
    """Sum over the samples in index order (``cumsum``): on CPU a row's sums then do not depend on where its
    padding lies or on the other rows, so its result is bit-identical alone or in any batch."""
    return t.cumsum(dim).select(dim, -1) if t.shape[dim] else t.sum(dim)


def fit_gmm_1d(x: Tensor, mask: Tensor, *, reg_covar: float = 1e-6, tol: float = 1e-3, max_iter: int = 100) -> GMMFit:
    """Fit scikit-learn's 2-component diag GaussianMixture, initialised as mmdetection does, to every row.

    Args:
        x: [G, N] float32, each row one candidate set (padded); float64 is accepted and kept, as
            scikit-learn keeps float64 data.
        mask: [G, N] bool, True on the row's valid samples (any positions; padding values are ignored).
        reg_covar, tol, max_iter: scikit-learn's settings (mmdetection uses the defaults).

    Returns:
        GMMFit with per-row parameters and scikit-learn's ``predict`` / ``score_samples`` on the valid
        samples. Degenerate rows are described in the module docstring.
    """
    _check_inputs(x, mask, reg_covar, tol, max_iter)
    # the EM loop is ~70 small operations per iteration: inference mode trims torch's per-call cost
    # (10-20 %); the results are cloned out of it, so the caller gets ordinary tensors (a caller already in
    # inference mode, as paa_reassign is, gets them as they are)
    if torch.is_inference_mode_enabled():
        return _fit(x, mask, reg_covar, tol, max_iter)
    with torch.inference_mode():
        fit = _fit(x, mask, reg_covar, tol, max_iter)
    return GMMFit(**{f.name: getattr(fit, f.name).clone() for f in fields(GMMFit)})


def _fit(x: Tensor, mask: Tensor, reg_covar: float, tol: float, max_iter: int) -> GMMFit:
    """:func:`fit_gmm_1d` after the input checks."""
    device = x.device
    num_rows = x.shape[0]
    x_in = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=device))
    if not bool(torch.isfinite(x_in).all()):
        raise GMMError("fit_gmm_1d: valid samples must be finite")
    n_valid = mask.sum(-1)
    active = n_valid >= 2
    x64 = x_in.double()
    x_sq = (x_in * x_in).double()
    valid = mask.unsqueeze(2)

    inf = torch.tensor(float("inf"), dtype=x.dtype, device=device)
    lo = torch.where(mask, x_in, inf).amin(-1)
    hi = torch.where(mask, x_in, -inf).amax(-1)
    has_any = n_valid > 0
    init_means = torch.stack([torch.where(has_any, lo, 0.0), torch.where(has_any, hi, 0.0)], -1)
    means = init_means.double()
    means_sq = (init_means * init_means).double()
    weights = torch.full((num_rows, 2), 0.5, dtype=torch.float64, device=device)
    prec_chol = torch.ones((num_rows, 2), dtype=torch.float64, device=device)
    variances = torch.ones((num_rows, 2), dtype=torch.float64, device=device)

    n_valid64 = n_valid.clamp(min=1).double()
    prev_lb = torch.full((num_rows,), -float("inf"), dtype=torch.float64, device=device)
    n_iter = torch.zeros(num_rows, dtype=torch.int64, device=device)
    converged = torch.zeros(num_rows, dtype=torch.bool, device=device)
    ill_defined = torch.zeros(num_rows, dtype=torch.bool, device=device)

    for iteration in range(1, max_iter + 1):
        wlp = _weighted_log_prob(x64, x_sq, means, means_sq, prec_chol, weights, ill_defined)
        log_norm = _logsumexp2(wlp)
        lb = _sample_sum(torch.where(mask, log_norm, 0.0), 1) / n_valid64
        resp = torch.where(valid, torch.exp(wlp - log_norm.unsqueeze(2)), 0.0)

        nk = _sample_sum(resp, 1) + 10 * _EPS64
        new_means = _sample_sum(resp * x64.unsqueeze(2), 1) / nk
        new_var = _sample_sum(resp * x_sq.unsqueeze(2), 1) / nk - new_means * new_means + reg_covar
        ill_now = ill_defined | (active & (new_var <= 0.0).any(-1))
        centred = _sample_sum(resp * (x64.unsqueeze(2) - new_means.unsqueeze(1)).square(), 1) / nk + reg_covar
        new_var = torch.where(ill_now.unsqueeze(1), centred, new_var)

        upd = active.unsqueeze(1)
        weights = torch.where(upd, nk / nk.sum(-1, keepdim=True), weights)
        means = torch.where(upd, new_means, means)
        means_sq = torch.where(upd, new_means * new_means, means_sq)
        variances = torch.where(upd, new_var, variances)
        prec_chol = torch.where(upd, 1.0 / torch.sqrt(new_var), prec_chol)

        ill_defined = ill_now
        done = active & ((lb - prev_lb).abs() < tol)
        converged = converged | done
        n_iter = torch.where(active, iteration, n_iter)
        prev_lb = torch.where(active, lb, prev_lb)
        active = active & ~done
        if iteration % SYNC_EVERY == 0 and iteration < max_iter and not bool(active.any()):
            break

    wlp = _weighted_log_prob(x64, x_sq, means, means_sq, prec_chol, weights, ill_defined)
    assign = (wlp[..., 1] > wlp[..., 0]).long()
    minus_one = torch.full_like(assign, -1)
    return GMMFit(
        assign=torch.where(mask, assign, minus_one),
        log_density=torch.where(mask, _logsumexp2(wlp), -float("inf")),
        means=means,
        variances=variances,
        weights=weights,
        n_iter=n_iter,
        converged=converged,
        ill_defined=ill_defined,
    )


def gmm_positives(fit: GMMFit, mask: Tensor) -> Tensor:
    """mmdetection's ``gmm_separation_scheme`` per row: [G, N] bool, the positive candidates.

    With each row's valid candidates in the caller's order (ascending score in PAA) and
    fg = the valid candidates assigned to component 0: if the row has at least 2 valid candidates and
    any fg, ``j`` = the position within fg of the highest ``log_density`` (``torch.topk(1)`` of the fg
    scores, so exact ties break as topk does on this device) and the positives are the first ``j + 1``
    fg candidates; otherwise none (mmdetection skips rows with < 2 candidates).

    Args:
        fit: the result of :func:`fit_gmm_1d` on the same mask.
        mask: [G, N] bool, the valid candidates.
    """
    if mask.shape != fit.assign.shape or mask.dtype != torch.bool:
        raise GMMError(
            f"gmm_positives: mask must be bool of shape {tuple(fit.assign.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    num_cols = mask.shape[1]
    fg = mask & (fit.assign == 0) & (mask.sum(-1, keepdim=True) >= 2)
    rank = fg.cumsum(-1)
    scores = torch.where(fg, fit.log_density, -float("inf"))
    at_best = fg & (scores == scores.amax(-1, keepdim=True))
    cut = torch.where(at_best, rank, num_cols + 1).amin(-1)
    tied = at_best.sum(-1) > 1
    if bool(tied.any()):
        cut = _topk_cut(cut, tied, fg, rank, scores)
    return fg & (rank <= cut.unsqueeze(1))


def _topk_cut(cut: Tensor, tied: Tensor, fg: Tensor, rank: Tensor, scores: Tensor) -> Tensor:
    """Redo ``j + 1`` of the rows with an exact tie at the best fg score by ``torch.topk(1)`` on their fg scores.

    topk's choice among equal values depends on the length of the array, so the rows are taken
    grouped by their number of fg samples (a loop over distinct lengths, at most N, never over rows).
    """
    rows = tied.nonzero().squeeze(1)
    sub_fg = fg[rows]
    num_cols = fg.shape[1]
    slot = torch.where(sub_fg, rank[rows] - 1, num_cols)
    packed = torch.full((rows.numel(), num_cols + 1), -float("inf"), dtype=scores.dtype, device=scores.device)
    packed.scatter_(1, slot, scores[rows])
    lengths = sub_fg.sum(-1)
    cut = cut.clone()
    for length in torch.unique(lengths).tolist():
        group = (lengths == length).nonzero().squeeze(1)
        best = packed[group, :length].topk(1, dim=-1).indices.squeeze(1)
        cut[rows[group]] = best + 1
    return cut
