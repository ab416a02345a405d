"""Part (b) of ``fedbicross privacy-audit``: SSIM nearest neighbours, the share test, pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbicross_flwr.privacy.nearest import (
    equal_pools,
    nearest,
    nearest_audit,
    pool_stats,
    save_pairs_picture,
    share_test,
    ssim_to_pool,
    to_pixels,
)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_equals_scikit_image(channels: int) -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(channels)
    pool, query = rng.random((6, channels, 28, 28)), rng.random((channels, 28, 28))
    pool[0] = query  # identical image: SSIM 1
    ours = ssim_to_pool(query, pool_stats(pool))
    ref = [structural_similarity(query, p, data_range=1.0, channel_axis=0) for p in pool]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert ours[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differs from the pool"):
        ssim_to_pool(query[:, :20], pool_stats(pool))


def test_equal_pools_subsample_the_larger_one_with_a_seed() -> None:
    train, test = equal_pools(10, 4, seed=3)
    assert len(train) == 4 and len(set(train.tolist())) == 4 and train.max() < 10
    assert list(train) == sorted(train) and list(test) == [0, 1, 2, 3]
    assert np.array_equal(train, equal_pools(10, 4, seed=3)[0])  # seeded
    train, test = equal_pools(3, 7, seed=0)
    assert list(train) == [0, 1, 2] and len(test) == 3


def test_share_test_by_hand() -> None:
    # 2 closer to train, 1 closer to test, 1 tie (left out): share 2/3 of n = 3
    t = share_test(np.array([0.9, 0.8, 0.1, 0.5]), np.array([0.1, 0.2, 0.3, 0.5]))
    assert (t.n, t.closer_to_train, t.ties) == (3, 2, 1)
    assert t.share == pytest.approx(2 / 3) and t.p_value == pytest.approx(1.0)
    # 10 of 10 closer to train: two-sided p = 2 * 0.5**10; exact CI [0.025**(1/10), 1]
    t = share_test(np.ones(10), np.zeros(10))
    assert t.share == 1.0 and t.p_value == pytest.approx(2 * 0.5**10)
    assert t.ci_low == pytest.approx(0.025 ** (1 / 10)) and t.ci_high == 1.0
    assert share_test(np.ones(2), np.ones(2)).share is None  # only ties


def _images(n: int, seed: int) -> torch.Tensor:
    """Random normalised images (N, 1, 28, 28) (mean 0.5 / std 0.5 space)."""
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_copies_of_training_images_are_found(tmp_path) -> None:
    # Prepare: 3 synthetic images copy training images, 1 copies a test image
    train, test, control = _images(5, 0), _images(5, 1), _images(4, 2)
    synthetic = torch.stack([train[4], train[0], test[2], train[2]])
    # Execute
    result, train_px, test_px = nearest_audit(synthetic, train, test, control, seed=0)
    # Assert: the copied images are their own nearest neighbours (SSIM 1)
    assert result.pool_size == 5 and list(result.train_index[[0, 1, 3]]) == [4, 0, 2]
    assert result.test_index[2] == 2
    np.testing.assert_allclose(result.best_train[[0, 1, 3]], 1.0)
    s = result.synthetic
    assert (s.n, s.closer_to_train, s.share) == (4, 3, 0.75)
    assert s.p_value == pytest.approx(2 * 5 / 16)  # 2 * P(X >= 3), X ~ Bin(4, 1/2)
    assert result.control is not None and result.control.n + result.control.ties == 4
    # Assert: the pairs picture, the closest pair first
    path = save_pairs_picture(tmp_path / "pairs.png", to_pixels(synthetic), train_px, test_px,
                              result, n_pairs=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[0] > 100  # two rows of images


def test_nearest_picks_the_most_similar_image() -> None:
    pool = _images(4, 5)
    noisy = pool[1] + 0.05 * _images(1, 6)[0]
    index, score = nearest(to_pixels(noisy[None]), pool_stats(to_pixels(pool)))
    assert index[0] == 1 and 0.5 < score[0] < 1.0
