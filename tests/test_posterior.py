"""The posterior-sampling helper shared by sample.py, LATINO's posterior and the tests (docs/method.md §4.2, §10.2):
per-(observation, sample) generators make every sample independent of the chunking, and the Welford statistics
equal the direct mean and std of the samples."""

from __future__ import annotations

import pytest
import torch

from ud2m.solvers.posterior import posterior_sample, sample_generators
from ud2m.utils import seed_for


def gaussian_sampler(mu: torch.Tensor, scale: float):
    """One exact draw per row from N(mu[index], scale² I), each row from its own generator."""

    def sample(y_rows, generators, index):
        z = torch.stack([torch.randn(mu.shape[1:], generator=g, dtype=mu.dtype) for g in generators])
        return mu[index] + scale * z, {"rows": index.clone()}

    return sample


@pytest.mark.parametrize("chunk", [1, 2, 3, None])
def test_samples_do_not_depend_on_the_chunking_and_statistics_are_direct(chunk):
    B, S = 3, 5
    mu = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = gaussian_sampler(mu, 0.3)
    ref = posterior_sample(fn, mu, num_samples=S, generators=sample_generators(7, range(B), S), keep_samples=True)
    post = posterior_sample(
        fn, mu, num_samples=S, generators=sample_generators(7, range(B), S), chunk=chunk, keep_samples=True
    )
    assert post.samples.shape == (B, S, 2, 4, 4) and post.calls == -(-S // (chunk or S))
    torch.testing.assert_close(post.samples, ref.samples, rtol=0, atol=0)
    torch.testing.assert_close(post.mean, post.samples.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post.std, post.samples.std(1), rtol=1e-10, atol=1e-12)
    first = posterior_sample(fn, mu, num_samples=S, generators=sample_generators(7, range(B), S), chunk=chunk)
    torch.testing.assert_close(first.samples, ref.samples[:, :1], rtol=0, atol=0)  # only sample 0 kept
    assert first.extras["rows"].tolist() == [i for i in range(B) for _ in range(min(chunk or S, S))]


def test_statistics_converge_to_the_sampled_law():
    """S = 4000 exact draws: the mean is within 5 standard errors of mu and the std within 5 % of the scale."""
    mu = torch.tensor([[[[0.5, -0.25]]]], dtype=torch.float64)
    post = posterior_sample(gaussian_sampler(mu, 0.2), mu, num_samples=4000, generators=sample_generators(0, [0], 4000))
    assert ((post.mean - mu).abs() <= 5 * 0.2 / 4000**0.5).all()
    assert ((post.std / 0.2 - 1).abs() < 0.05).all()


def test_one_sample_has_no_spread_and_wrong_generator_counts_are_refused():
    mu = torch.zeros(2, 1, 2, 2)
    post = posterior_sample(gaussian_sampler(mu, 1.0), mu, num_samples=1, generators=sample_generators(0, [0, 1], 1))
    assert post.std is None and post.samples.shape == (2, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="expected 4 generators"):
        posterior_sample(gaussian_sampler(mu, 1.0), mu, num_samples=2, generators=sample_generators(0, [0], 2))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        posterior_sample(gaussian_sampler(mu, 1.0), mu, num_samples=0, generators=[])


def test_sample_generators_follow_the_seed_scheme():
    """Sample s of observation i draws from seed_for(seed, 0, i, s) (stream 0 of §1.5), whatever the batch."""
    gens = sample_generators(3, [4, 9], 2)
    expected = [seed_for(3, 0, i, s) for i in (4, 9) for s in range(2)]
    assert [g.initial_seed() for g in gens] == expected
