"""paadet.train.gmm against scikit-learn's GaussianMixture called exactly as mmdetection 3.3's PAAHead calls it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from paadet.bench.profiling import count_device_work
from paadet.train.gmm import SYNC_EVERY, GMMError, GMMFit, fit_gmm_1d, gmm_positives

NUM_SETS = 1000
MAX_LEN = 45
KINDS = (
    "two_clusters",
    "one_cluster",
    "heavy_tails",
    "lognormal",
    "identical",
    "two_samples",
    "near_duplicates",
    "pooled_duplicates",
)


def test_sklearn_has_the_mirrored_diag_formula():
    # paadet mirrors the diag M-step of scikit-learn >= 1.7 (sum r x^2 / n_k - mu^2, PR #30414); 1.6.1 and
    # older compute sum r x^2 / n_k - 2 mu (sum r x / n_k) + mu^2, which rounds differently
    assert tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 7), sklearn.__version__


def _candidate_set(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One sorted float32 candidate set of 2..45 scores, scale anywhere in 1e-3..1e2."""
    n = 2 if kind == "two_samples" else int(rng.integers(2, MAX_LEN + 1))
    scale = 10.0 ** rng.uniform(-3, 2)
    if kind == "two_clusters":
        n0 = int(rng.integers(1, n))
        v = np.concatenate(
            [
                rng.normal(1.0, rng.uniform(0.05, 0.5), n0),
                rng.normal(rng.uniform(1.5, 6.0), rng.uniform(0.05, 1.0), n - n0),
            ]
        )
    elif kind == "one_cluster":
        v = rng.normal(1.0, rng.uniform(0.01, 0.5), n)
    elif kind == "heavy_tails":
        v = np.abs(rng.standard_t(1.2, n))
    elif kind == "lognormal":
        v = rng.lognormal(0.0, 1.5, n)
    elif kind == "identical":
        v = np.full(n, rng.uniform(0.1, 10.0))
    elif kind == "two_samples":
        v = rng.uniform(0.0, 3.0, n)
    elif kind == "near_duplicates":
        base = np.float32(rng.uniform(0.5, 5.0) * scale)
        bits = np.full(n, base, dtype=np.float32).view(np.int32) + rng.integers(0, 4, n).astype(np.int32)
        return np.sort(bits.view(np.float32))
    else:
        v = rng.choice(rng.uniform(0.2, 4.0, int(rng.integers(2, 6))), n)
    return np.sort((v * scale).astype(np.float32))


def _sklearn(v: np.ndarray, covariance_type: str = "diag") -> dict | None:
    """mmdetection's call: fit, predict, score_samples on the (n, 1) array; None where fit raises ill-defined."""
    pos_loss_gmm = v.reshape(-1, 1)
    min_loss, max_loss = pos_loss_gmm.min(), pos_loss_gmm.max()
    means_init = np.array([min_loss, max_loss]).reshape(2, 1)
    weights_init = np.array([0.5, 0.5])
    precisions_init = np.array([1.0, 1.0]).reshape(2, 1, 1)
    if covariance_type == "diag":
        precisions_init = precisions_init.reshape(2, 1)
    gmm = GaussianMixture(
        2,
        weights_init=weights_init,
        means_init=means_init,
        precisions_init=precisions_init,
        covariance_type=covariance_type,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            gmm.fit(pos_loss_gmm)
        except ValueError as exc:
            assert "ill-defined empirical covariance" in str(exc)
            return None
    return {
        "assign": gmm.predict(pos_loss_gmm),
        "scores": gmm.score_samples(pos_loss_gmm),
        "proba": gmm.predict_proba(pos_loss_gmm),
        "n_iter": gmm.n_iter_,
        "converged": gmm.converged_,
    }


def _mmdet_positives(gmm_assignment: np.ndarray, scores: np.ndarray) -> list[int]:
    """mmdetection's gmm_separation_scheme, transcribed: indices (in sorted order) of the positives."""
    gmm_assignment = torch.from_numpy(gmm_assignment)
    scores = torch.from_numpy(scores)
    pos_inds_gmm = torch.arange(len(scores))
    fgs = gmm_assignment == 0
    pos_inds_temp = fgs.new_tensor([], dtype=torch.long)
    if fgs.nonzero().numel():
        _, pos_thr_ind = scores[fgs].topk(1)
        pos_inds_temp = pos_inds_gmm[fgs][: pos_thr_ind + 1]
    return pos_inds_temp.tolist()


def _pad(sets: list[np.ndarray], width: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(sets), width)
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    for i, v in enumerate(sets):
        x[i, : len(v)] = torch.from_numpy(v)
        mask[i, : len(v)] = True
    return x, mask


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(20240607)
    kinds = [KINDS[i % len(KINDS)] for i in range(NUM_SETS)]
    sets = [_candidate_set(rng, kind) for kind in kinds]
    x, mask = _pad(sets)
    fit = fit_gmm_1d(x, mask)
    return {
        "kinds": kinds,
        "sets": sets,
        "x": x,
        "mask": mask,
        "fit": fit,
        "pos": gmm_positives(fit, mask),
        "sk": [_sklearn(v) for v in sets],
    }


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


def _self_discrepancy(v: np.ndarray, r: dict, orderings: int = 3) -> float:
    """How far scikit-learn's log densities move when the same samples come in other orders (seeded permutations):
    the size of the float32 rounding noise of a row, one summation order being only one sample of it."""
    worst = 0.0
    for seed in range(1, orderings + 1):
        perm = np.random.default_rng(seed).permutation(len(v))
        other = _sklearn(v[perm].copy())
        if other is None:
            return float("inf")
        worst = max(worst, _rel_err(other["scores"][np.argsort(perm)], r["scores"]))
    return worst


def test_agrees_with_sklearn_on_1000_sets(reference):
    """Every row matches scikit-learn (assign, n_iter, converged, positives, score_samples to 1e-6 relative),
    except rows where scikit-learn sits on a tie or disagrees with itself.

    Ties: samples whose predict_proba is 0.5 to 1e-9 may go either way. Rounding-chaotic rows: near-duplicate
    losses whose spread is below the float32 rounding of x * x, so the diag formula's variance is rounding
    noise; scikit-learn run on the same samples in reverse order (a different BLAS summation order) then
    differs from itself. There we only require log densities within 10x scikit-learn's own discrepancy, the
    largest over the reversed order and a few seeded permutations (one order is one sample of the noise: on an
    AMD EPYC a chaotic row was 11x the reversed order's discrepancy, 1.6x the permutations').
    """
    fit, sets, sk, pos = reference["fit"], reference["sets"], reference["sk"], reference["pos"]
    ill_sk = torch.tensor([r is None for r in sk])
    assert torch.equal(fit.ill_defined, ill_sk)
    assert 50 <= int(ill_sk.sum()) <= 200  # the degenerate path is exercised, the rest is the bulk
    exact, tie_rows, chaotic, ties_at_best, max_rel = 0, 0, 0, 0, 0.0
    for i, (v, r) in enumerate(zip(sets, sk, strict=False)):
        if r is None:
            continue
        n = len(v)
        assign, ld = fit.assign[i, :n].numpy(), fit.log_density[i, :n].numpy()
        differ = assign != r["assign"]
        at_tie = bool(np.all(np.abs(r["proba"][differ, 0] - 0.5) < 1e-9))
        rel = _rel_err(ld, r["scores"])
        same_iter = int(fit.n_iter[i]) == r["n_iter"] and bool(fit.converged[i]) == r["converged"]
        if not differ.any() and rel <= 1e-6 and same_iter:
            assert pos[i].nonzero().squeeze(1).tolist() == _mmdet_positives(r["assign"], r["scores"]), i
            exact += 1
            max_rel = max(max_rel, rel)
            fg_scores = r["scores"][r["assign"] == 0]
            ties_at_best += int(fg_scores.size > 0 and np.sum(fg_scores == fg_scores.max()) > 1)
        elif at_tie and rel <= 1e-6 and same_iter:
            tie_rows += 1
        else:
            rev = _sklearn(v[::-1].copy())
            self_rel = _rel_err(rev["scores"][::-1], r["scores"]) if rev is not None else float("inf")
            assert (
                rev is None
                or rev["n_iter"] != r["n_iter"]
                or self_rel > 1e-7
                or not np.array_equal(rev["assign"][::-1], r["assign"])
            ), i
            assert rel <= max(1e-6, 10 * max(self_rel, _self_discrepancy(v, r))), i
            chaotic += 1
    assert exact >= 860 and tie_rows + chaotic <= 15  # measured: 875 exact, 8 tie or chaotic rows
    assert max_rel < 1e-6
    assert ties_at_best >= 10  # rows where the positives depend on torch.topk's tie-breaking


def test_ill_defined_rows_follow_full_covariance_in_float64(reference):
    fit, sets, sk = reference["fit"], reference["sets"], reference["sk"]
    for i, (v, r) in enumerate(zip(sets, sk, strict=False)):
        if r is not None:
            continue
        n = len(v)
        full = _sklearn(v.astype(np.float64), covariance_type="full")
        differ = fit.assign[i, :n].numpy() != full["assign"]
        # near-duplicate rows leave two components a few ulps apart: a tie either way can break
        assert np.all(np.abs(full["proba"][differ, 0] - 0.5) < 1e-9), i
        assert int(fit.n_iter[i]) == full["n_iter"], i
        np.testing.assert_allclose(fit.log_density[i, :n].numpy(), full["scores"], rtol=1e-9, atol=1e-9)
        assert bool((fit.variances[i] >= 1e-6).all())


def test_documented_ill_defined_case():
    # one loss far above a tight pack of equal ones: the lone component collapses onto 57.3, whose float32
    # square misses mu^2 by more than reg_covar, so scikit-learn's diag M-step raises
    v = np.array([1.0, 1.0, 1.0, 57.3], dtype=np.float32)
    assert _sklearn(v) is None
    x, mask = _pad([v], width=4)
    fit = fit_gmm_1d(x, mask)
    assert fit.ill_defined.tolist() == [True]
    assert fit.assign.tolist() == [[0, 0, 0, 1]]
    assert bool(torch.isfinite(fit.log_density).all())
    torch.testing.assert_close(fit.variances, torch.tensor([[1e-6, 1e-6]], dtype=torch.float64), rtol=1e-6, atol=0)
    assert gmm_positives(fit, mask).tolist() == [[True, False, False, False]]


def test_hand_computed_two_pairs():
    # x = [0, 0, 10, 10]: the first E-step gives responsibilities 1 and e^-50, so after one M-step each
    # component sits on its pair with variance reg_covar; lb goes -1.612 (init) -> 5.2957 -> 5.2957, so
    # n_iter = 3; log density = log 0.5 - 0.5 log(2 pi) - 0.5 log(1e-6) at every sample
    x = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    fit = fit_gmm_1d(x, mask)
    assert fit.n_iter.tolist() == [3] and fit.converged.tolist() == [True] and fit.ill_defined.tolist() == [False]
    assert fit.assign.tolist() == [[0, 0, 1, 1]]
    expected = math.log(0.5) - 0.5 * math.log(2 * math.pi) - 0.5 * math.log(1e-6)
    torch.testing.assert_close(fit.log_density, torch.full((1, 4), expected, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(fit.means, torch.tensor([[0.0, 10.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(fit.variances, torch.tensor([[1e-6, 1e-6]], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(fit.weights, torch.tensor([[0.5, 0.5]], dtype=torch.float64), rtol=1e-12, atol=0)


def test_gmm_positives_hand_cases():
    inf = float("inf")
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool
    )
    assign = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 1, 1, 1], [0, -1, -1, -1, -1], [0, 0, 0, 0, 0], [0, -1, 0, 1, -1]])
    log_density = torch.tensor(
        [
            [1.0, 5.0, 3.0, 2.0, 0.0],
            [1.0, 2.0, 3.0, 4.0, 5.0],
            [7.0, -inf, -inf, -inf, -inf],
            [1.0, 2.0, 3.0, 4.0, 5.0],
            [2.0, -inf, 1.0, 9.0, -inf],
        ],
        dtype=torch.float64,
    )
    zeros = torch.zeros(5, 2, dtype=torch.float64)
    fit = GMMFit(
        assign=assign,
        log_density=log_density,
        means=zeros,
        variances=zeros,
        weights=zeros,
        n_iter=torch.zeros(5, dtype=torch.int64),
        converged=torch.zeros(5, dtype=torch.bool),
        ill_defined=torch.zeros(5, dtype=torch.bool),
    )
    # row 0: fg = {0, 2, 3} with scores 1, 3, 2 -> peak at fg index 1 -> the first 2 fg; row 1: no fg;
    # row 2: fewer than 2 candidates (mmdetection skips it); row 3: peak at the last; row 4: padding between
    assert gmm_positives(fit, mask).int().tolist() == [
        [1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]


def test_rows_with_fewer_than_two_samples():
    x = torch.tensor([[2.5, 9.0, 9.0], [7.0, 7.0, 7.0], [1.0, 3.0, 3.5]])
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    fit = fit_gmm_1d(x, mask)
    assert fit.n_iter.tolist()[:2] == [0, 0] and fit.converged.tolist()[:2] == [False, False]
    assert fit.means[:2].tolist() == [[2.5, 2.5], [0.0, 0.0]]
    assert fit.variances[:2].tolist() == [[1.0, 1.0], [1.0, 1.0]] and fit.weights[:2].tolist() == [[0.5, 0.5]] * 2
    assert fit.assign[:2].tolist() == [[0, -1, -1], [-1, -1, -1]]
    assert fit.log_density[0, 0].item() == pytest.approx(-0.5 * math.log(2 * math.pi))
    assert bool(torch.isneginf(fit.log_density[1]).all())
    assert gmm_positives(fit, mask)[:2].any().item() is False
    assert fit.n_iter[2].item() == _sklearn(x[2].numpy())["n_iter"]


def test_identical_values_match_sklearn():
    for value in (0.5, 1.7, 3.0):
        v = np.full(9, value, dtype=np.float32)
        r = _sklearn(v)
        fit = fit_gmm_1d(torch.from_numpy(v)[None], torch.ones(1, 9, dtype=torch.bool))
        assert fit.assign[0].tolist() == r["assign"].tolist() == [0] * 9
        assert fit.n_iter.item() == r["n_iter"]
        np.testing.assert_allclose(fit.log_density[0].numpy(), r["scores"], rtol=1e-12)
        np.testing.assert_allclose(fit.variances[0].numpy(), [1e-6, 1e-6], rtol=0.1)


def test_padding_and_other_rows_do_not_change_a_row(reference):
    rng = np.random.default_rng(7)
    sets = reference["sets"][:60]
    width = MAX_LEN + 7
    x = torch.from_numpy(rng.uniform(-1e30, 1e30, (len(sets), width)).astype(np.float32))
    x[::3, -1] = float("nan")
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    for i, v in enumerate(sets):  # valid samples at random positions, garbage in between
        where = torch.from_numpy(np.sort(rng.choice(width, len(v), replace=False)))
        x[i, where] = torch.from_numpy(v)
        mask[i, where] = True
    batched = fit_gmm_1d(x, mask)
    pos = gmm_positives(batched, mask)
    for i, v in enumerate(sets):
        alone = fit_gmm_1d(torch.from_numpy(v)[None], torch.ones(1, len(v), dtype=torch.bool))
        assert torch.equal(alone.assign[0], batched.assign[i][mask[i]])
        assert torch.equal(alone.log_density[0], batched.log_density[i][mask[i]])
        for name in ("means", "variances", "weights", "n_iter", "converged", "ill_defined"):
            assert torch.equal(getattr(alone, name)[0], getattr(batched, name)[i]), name
        assert torch.equal(gmm_positives(alone, torch.ones_like(alone.assign, dtype=torch.bool))[0], pos[i][mask[i]])


def test_host_syncs_and_ops_do_not_grow_with_rows(reference):
    # rows without exact ties, so gmm_positives takes its single-sync path
    base = [v for v, kind in zip(reference["sets"], reference["kinds"], strict=False) if kind == "two_clusters"][:8]
    counts = []
    for copies in (1, 100):
        x, mask = _pad(base * copies)
        counts.append(count_device_work(lambda x=x, mask=mask: gmm_positives(fit_gmm_1d(x, mask), mask)))
    assert counts[0].syncs == counts[1].syncs
    assert abs(counts[0].ops - counts[1].ops) <= 4  # ~320 ops for 8 rows and for 800: no work per row
    assert counts[0].syncs <= math.ceil(100 / SYNC_EVERY) + 2


def test_bad_inputs_raise():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(GMMError, match="finite"):
        fit_gmm_1d(torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]]), mask)
    with pytest.raises(GMMError, match="float32"):
        fit_gmm_1d(torch.ones(2, 3, dtype=torch.int64), mask)
    with pytest.raises(GMMError, match="mask"):
        fit_gmm_1d(torch.ones(2, 3), mask[:, :2])
    with pytest.raises(GMMError, match="G, N"):
        fit_gmm_1d(torch.ones(6), mask.flatten())


def test_results_are_ordinary_tensors_outside_inference_mode():
    x = torch.tensor([[0.1, 0.2, 0.3, 2.0, 2.1, 2.2]])
    mask = torch.ones_like(x, dtype=torch.bool)
    fit = fit_gmm_1d(x, mask)
    assert not any(t.is_inference() for t in (fit.assign, fit.log_density, fit.means, fit.n_iter))
    fit.means.add_(0)  # in-place use is allowed (an inference tensor would refuse it)
    with torch.inference_mode():
        inside = fit_gmm_1d(x, mask)
    assert torch.equal(inside.assign, fit.assign) and torch.equal(inside.log_density, fit.log_density)
