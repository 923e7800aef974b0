"""verified after approximate top-k: coverage on synthetic rows.

The estimate is unbiased whatever the front chose (the residual is every allowed key
no earlier part took), but the sample size comes from a pilot's variance. When the
front misses a key that holds most of a row's mass, a small pilot usually misses it
too and the budget comes out tiny: verified therefore takes residual keys above its
heavy threshold exactly (stats.heavy_threshold), whatever the front.
"""
import math

import pytest
import torch

from vattn import metrics
from vattn.attend import attend, dense_attend
from vattn.spec import select
from vattn.synthetic import make_inputs, scores

EPS, DELTA, ROWS, N, D = 0.1, 0.1, 300, 512, 32


def paged_inputs(family, seed=0, page=16):
    """Rows with locality, as Quest assumes: keys share a direction within a page and
    similar scores sit together (the pages are in random order)."""
    g = torch.Generator().manual_seed(seed)
    a = scores(family, ROWS, N, g).sort(-1, descending=True).values
    pages = torch.stack([torch.randperm(N // page, generator=g) for _ in range(ROWS)])
    pos = (pages[:, :, None] * page + torch.arange(page)).reshape(ROWS, N)
    a = torch.empty_like(a).scatter_(1, pos, a)
    scale = D ** -0.5
    q = torch.randn(ROWS, D, generator=g, dtype=torch.float64)
    qn = q / q.norm(dim=-1, keepdim=True)
    noise = torch.randn(ROWS, N // page, 1, D, generator=g, dtype=torch.float64).expand(-1, -1, page, -1)
    noise = noise.reshape(ROWS, N, D) + 0.05 * torch.randn(ROWS, N, D, generator=g, dtype=torch.float64)
    noise = noise - (noise @ qn[:, :, None]) * qn[:, None, :]
    k = a[..., None] * (q / q.norm(dim=-1, keepdim=True) ** 2 / scale)[:, None] + noise
    v = torch.randn(ROWS, N, D, generator=g, dtype=torch.float64)
    return q[:, None, None].float(), k[:, None].float(), v[:, None].float(), scale


def coverage(spec, family, paged=False, seed=0):
    if paged:
        q, k, v, scale = paged_inputs(family, seed=seed)
    else:
        q, k, v, scale = make_inputs(family, rows=ROWS, n=N, d=D, seed=seed)
    sel = select(spec, q, k, v, scale=scale, seed=seed)
    err = metrics.relative_error(attend(q, k, v, sel, scale=scale), dense_attend(q, k, v, scale=scale))
    return float((err <= EPS).float().mean())


NEED = 1 - DELTA - 3 * math.sqrt(DELTA * (1 - DELTA) / ROWS)
VERIFIED = f"verified(eps={EPS},delta={DELTA})"


@pytest.mark.parametrize("family", ["heavy", "peaked"])
def test_coverage_after_hashtopk(family):
    assert coverage(f"hashtopk(0.1, bits=128)+{VERIFIED}", family) >= NEED


@pytest.mark.parametrize("family", ["heavy", "peaked"])
def test_coverage_after_quest_on_paged_keys(family):
    assert coverage(f"quest(0.05, page=16)+{VERIFIED}", family, paged=True) >= NEED


def test_fronts_alone_miss_eps():
    # Without verified the same fronts are far from eps: the tests above are not vacuous.
    assert coverage("hashtopk(0.1, bits=128)", "peaked") < NEED - 0.05
    assert coverage("quest(0.05, page=16)", "peaked", paged=True) < NEED - 0.05


def test_coverage_after_a_near_random_front():
    # A front that misses the dominant keys: verified takes the residual keys above its
    # heavy threshold exactly (they used to be left to a pilot that missed them).
    assert coverage(f"hashtopk(0.05, bits=1)+{VERIFIED}", "heavy") >= NEED


def test_near_random_front_fails_without_the_heavy_cut():
    # The same row set with the cut off: the test above is not vacuous.
    assert coverage(f"hashtopk(0.05, bits=1)+verified(eps={EPS},delta={DELTA},heavy=0)", "heavy") < NEED
