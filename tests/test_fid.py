"""FID: the Frechet distance against closed forms, the statistics, the network."""

import importlib.util
import os
import re
import subprocess
import sys

import _inception
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from _train_helpers import one_line_error

from stochinterp import couplings, evaluate, fid, fid_eval, sharding
from stochinterp.models import inception


def _random_cov(rng, dim, rank=None):
    root = rng.normal(size=(dim, rank or dim))
    return root @ root.T / dim


# The Frechet distance against closed forms.


def test_frechet_distance_in_one_dimension_is_mean_and_std_gaps_squared():
    value = fid.frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]])
    assert value == pytest.approx((1 + 2) ** 2 + (2 - 0.5) ** 2, rel=1e-12)


def test_frechet_distance_of_isotropic_gaussians():
    dim, scale = 7, 3.0
    eye = np.eye(dim)
    value = fid.frechet_distance(np.zeros(dim), eye, np.zeros(dim), scale**2 * eye)
    assert value == pytest.approx(dim * (1 - scale) ** 2, rel=1e-12)


def test_frechet_distance_of_diagonal_covariances_sums_per_axis_terms():
    rng = np.random.default_rng(0)
    mean1, mean2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mean1 - mean2) ** 2) + np.sum(
        (np.sqrt(var1) - np.sqrt(var2)) ** 2
    )
    value = fid.frechet_distance(mean1, np.diag(var1), mean2, np.diag(var2))
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_singular_covariances():
    # S1 = diag(1, 0): S1^1/2 S2 S1^1/2 = diag(S2[0, 0], 0), so the cross term
    # is sqrt(S2[0, 0]) = sqrt(2).
    cov2 = np.array([[2.0, 1.0], [1.0, 2.0]])
    value = fid.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), cov2)
    assert value == pytest.approx(5 - 2 * np.sqrt(2), rel=1e-12)


def _naive_cross_term(cov1, cov2):
    """Wrong unless the covariances commute: tr(S1^1/2 S2^1/2)."""
    return np.trace(scipy.linalg.sqrtm(cov1) @ scipy.linalg.sqrtm(cov2)).real


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    rng = np.random.default_rng(1)
    dim = 6
    cov1, cov2 = _random_cov(rng, dim), _random_cov(rng, dim)
    mean1, mean2 = rng.normal(size=dim), rng.normal(size=dim)
    cross = np.trace(scipy.linalg.sqrtm(cov1 @ cov2)).real
    expected = (
        np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * cross
    )
    value = fid.frechet_distance(mean1, cov1, mean2, cov2)
    assert value == pytest.approx(expected, rel=1e-9)
    assert value == pytest.approx(fid.frechet_distance(mean2, cov2, mean1, cov1))
    # The test tells the right cross term from the commuting-only shortcut.
    naive = np.trace(cov1) + np.trace(cov2) - 2 * _naive_cross_term(cov1, cov2)
    assert abs(naive + np.sum((mean1 - mean2) ** 2) - value) > 1e-3


def test_frechet_distance_is_unchanged_by_a_common_rotation_and_shift():
    rng = np.random.default_rng(2)
    dim = 5
    cov1, cov2 = _random_cov(rng, dim, rank=3), _random_cov(rng, dim)
    mean1, mean2 = rng.normal(size=dim), rng.normal(size=dim)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    shift = rng.normal(size=dim)
    moved = fid.frechet_distance(
        rotation @ mean1 + shift,
        rotation @ cov1 @ rotation.T,
        rotation @ mean2 + shift,
        rotation @ cov2 @ rotation.T,
    )
    assert moved == pytest.approx(fid.frechet_distance(mean1, cov1, mean2, cov2))


def test_frechet_distance_is_never_negative_and_takes_integers():
    for seed in range(10):  # round-off takes some of these below zero
        rng = np.random.default_rng(seed)
        cov, mean = _random_cov(rng, 6), rng.normal(size=6)
        assert fid.frechet_distance(mean, cov, mean, cov) >= 0
    assert fid.frechet_distance([1], [[4]], [-2], [[1]]) == 10.0


def test_only_eigenvalues_within_round_off_of_zero_are_dropped():
    # The floor is dim * eps * the largest: 100 * 2.2e-16 here.
    values = np.r_[1.0, np.full(99, 1e-15), np.full(100, 1e-13)]
    kept = fid._round_off_to_zero(values)
    assert np.count_nonzero(kept) == 101
    np.testing.assert_array_equal(kept[100:], values[100:])


def test_frechet_distance_of_a_gaussian_to_itself_is_zero():
    rng = np.random.default_rng(3)
    cov = _random_cov(rng, 40, rank=10)  # singular, as with few images
    mean = rng.normal(size=40)
    assert fid.frechet_distance(mean, cov, mean, cov) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_keeps_the_small_eigenvalues_of_a_full_rank_covariance():
    """Eigenvalues from 1e-7 to 10: FID(S, c^2 S) = (1 - c)^2 tr(S) exactly.

    The product S^1/2 (c^2 S) S^1/2 has eigenvalues down to 1e-14, below its
    own round-off floor; they count (the distance was 7e-5 too large without them)."""
    rng = np.random.default_rng(21)
    dim, c = 256, 1.1
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    values = np.exp(rng.uniform(np.log(1e-7), np.log(10.0), dim))
    cov = (rotation * values) @ rotation.T
    cov = (cov + cov.T) / 2
    mean = np.zeros(dim)
    exact = (1 - c) ** 2 * values.sum()
    value = fid.frechet_distance(mean, cov, mean, c * c * cov)
    assert value == pytest.approx(exact, rel=1e-9)
    assert fid.frechet_distance(mean, cov, mean, cov) == pytest.approx(0, abs=1e-9)


def test_sample_fid_of_two_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    dim, n = 3, 200_000
    cov1, cov2 = _random_cov(rng, dim), _random_cov(rng, dim)
    mean2 = np.array([0.5, -0.5, 0.0])
    a, b = fid.FeatureStatistics(dim), fid.FeatureStatistics(dim)
    a.update(rng.multivariate_normal(np.zeros(dim), cov1, size=n))
    b.update(rng.multivariate_normal(mean2, cov2, size=n))
    exact = fid.frechet_distance(np.zeros(dim), cov1, mean2, cov2)
    assert fid.fid_from_statistics(a, b) == pytest.approx(exact, abs=0.01)


def test_frechet_distance_refuses_what_is_not_a_covariance():
    with pytest.raises(ValueError, match=r"cov1 has a negative eigenvalue \(-5,"):
        fid.frechet_distance(np.zeros(2), -5 * np.eye(2), np.zeros(2), np.eye(2))
    upper = np.array([[1.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="cov2 is not symmetric"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), upper)
    with pytest.raises(ValueError, match="mean1 holds complex128 values"):
        fid.frechet_distance(np.zeros(2) + 1j, np.eye(2), np.zeros(2), np.eye(2))


def test_fid_of_few_images_does_not_depend_on_the_order_of_the_sums():
    """Rank 7 of 2048: the zero eigenvalues' round-off must not add up."""
    features = np.random.default_rng(12).gamma(1.0, 1.0, size=(16, 2048)) * 4
    first, second = features[:8], features[8:]
    whole, parts, other = (fid.FeatureStatistics() for _ in range(3))
    whole.update(first)
    parts.update(first[:4])
    parts.update(first[4:])
    other.update(second)
    distance = fid.fid_from_statistics(whole, other)
    assert len(fid._root_factors(whole.covariance, "whole")[1]) == 7
    # Without the round-off floor: 1.4e-10 and 2.0e-10 apart.
    assert fid.fid_from_statistics(parts, other) == pytest.approx(distance, rel=1e-12)
    assert fid.fid_from_statistics(other, whole) == pytest.approx(distance, rel=1e-12)


def test_statistics_keep_their_digits_under_a_large_common_offset():
    rng = np.random.default_rng(13)
    features = rng.normal(size=(2000, 4)) + 1e8
    stats = fid.FeatureStatistics(4)
    for part in np.split(features, 20):
        stats.update(part)
    np.testing.assert_allclose(stats.covariance, np.cov(features.T), atol=1e-6)
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-14)


@pytest.mark.parametrize(
    "args, words",
    [
        ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "[(2,), (3, 3)"),
        ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), "[(2, 2), (2, 2)"),
        ((np.zeros(2), np.eye(2), np.full(2, np.nan), np.eye(2)), "mean2 holds"),
        ((np.zeros(0), np.eye(0), np.zeros(0), np.eye(0)), "[(0,), (0, 0)"),
    ],
)
def test_frechet_distance_names_bad_inputs(args, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        fid.frechet_distance(*args)


# Statistics accumulated batch by batch.


def test_statistics_in_batches_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(50, 4)) * [1, 2, 3, 4] + [5, 0, -5, 1]
    stats = fid.FeatureStatistics(4)
    for part in np.split(features, [7, 30]):
        stats.update(part)
    assert stats.count == 50
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(features.T), rtol=1e-10)


def test_statistics_refuse_wrong_width_non_finite_and_fewer_than_two():
    stats = fid.FeatureStatistics(3)
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \[batch, 3\]"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.array([[0.0, np.inf, 0.0]]))
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        _ = stats.covariance


def test_saved_statistics_hold_mean_covariance_and_count(tmp_path):
    stats = fid.FeatureStatistics(2)
    stats.update(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]]))
    fid.save_statistics(tmp_path / "s.npz", stats)
    with np.load(tmp_path / "s.npz") as saved:
        np.testing.assert_allclose(saved["mu"], [2.0, 4.0])
        np.testing.assert_allclose(saved["sigma"], [[4.0, 7.0], [7.0, 13.0]])
        assert int(saved["count"]) == 3
    with pytest.raises(ValueError, match="stats' must end in .npz"):
        fid.save_statistics(tmp_path / "stats", stats)  # numpy would add .npz
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


# The Inception network.


@pytest.fixture(scope="module")
def random_inception():
    return _inception.random_weights()


def test_the_network_has_the_fid_inception_weights():
    shapes = inception.variable_shapes()
    assert inception.parameter_count() == 21_785_568  # no classifier
    assert sum(name.endswith("conv.weight") for name in shapes) == 94
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)


def test_block_outputs_have_the_inception_sizes():
    images = jax.ShapeDtypeStruct((2, 64, 48, 3), jnp.float32)
    model = inception.InceptionFeatures()
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True), variables, images
    )
    shapes = {
        name: value["__call__"][0].shape
        for name, value in state["intermediates"].items()
        if name != "__call__"
    }
    assert shapes["Conv2d_4a_3x3"] == (2, 71, 71, 192)
    assert shapes["Mixed_5d"] == (2, 35, 35, 288)
    assert shapes["Mixed_6e"] == (2, 17, 17, 768)
    assert shapes["Mixed_7c"] == (2, 8, 8, 2048)
    assert out.shape == (2, inception.FEATURES)


def _bilinear_half_pixel(image, size):
    """Reference resize: source = (i + 0.5) in / out - 0.5, clamped at 0."""

    def weights(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    (r0, r1, fr), (c0, c1, fc) = weights(image.shape[0]), weights(image.shape[1])
    rows = image[r0] * (1 - fr)[:, None, None] + image[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


@pytest.mark.parametrize("side", [16, 512])
def test_images_are_resized_bilinearly_with_half_pixel_centres(side):
    image = np.random.default_rng(7).uniform(-1, 1, (side, side + 3, 3))
    resized = inception.resize_to_input(jnp.asarray(image[None], jnp.float32))
    np.testing.assert_allclose(resized[0], _bilinear_half_pixel(image, 299), atol=1e-4)


def test_mean_pooling_counts_only_real_pixels():
    ones = jnp.ones((1, 4, 5, 2))
    np.testing.assert_array_equal(inception._mean_pool_3x3(ones), ones)


def _pool_branch(arrays, block, pooled):
    """relu(batch norm(1x1 conv)) of a block's pooled input, in numpy."""
    prefix = f"{block}.branch_pool."
    kernel = arrays[prefix + "conv.weight"][:, :, 0, 0]
    y = pooled @ kernel.T
    scale = arrays[prefix + "bn.weight"] / np.sqrt(
        arrays[prefix + "bn.running_var"] + inception.BATCH_NORM_EPS
    )
    y = (y - arrays[prefix + "bn.running_mean"]) * scale + arrays[prefix + "bn.bias"]
    return np.maximum(y, 0)


def _pool_3x3(x, reduce):
    """3x3 window, stride 1, over real pixels only."""
    height, width = x.shape[1:3]
    out = np.empty_like(x)
    for i in range(height):
        for j in range(width):
            window = x[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            out[:, i, j] = reduce(window, axis=(1, 2))
    return out


@pytest.mark.parametrize(
    "block, module, channels, reduce",
    [
        ("Mixed_5b", inception._BlockA(32), 192, np.mean),
        ("Mixed_6b", inception._BlockC(128), 768, np.mean),
        ("Mixed_7b", inception._BlockE(), 1280, np.mean),
        ("Mixed_7c", inception._BlockE(max_pool=True), 2048, np.max),
    ],
)
def test_the_last_branch_pools_as_the_fid_network_does(
    random_inception, block, module, channels, reduce
):
    x = np.random.default_rng(8).normal(size=(2, 5, 6, channels)).astype(np.float32)
    variables = inception._to_variables(
        {
            k[len(block) + 1 :]: v
            for k, v in random_inception.items()
            if k.startswith(block + ".")
        }
    )
    out = module.apply(variables, jnp.asarray(x))
    expected = _pool_branch(random_inception, block, _pool_3x3(x, reduce))
    np.testing.assert_allclose(out[..., -expected.shape[-1] :], expected, atol=2e-4)


def test_weights_round_trip_through_a_file(random_inception, tmp_path):
    path = tmp_path / "inception.npz"
    extra = {
        "fc.weight": np.zeros((1008, 2048), np.float32),
        "Mixed_5b.branch1x1.bn.num_batches_tracked": np.array(0),
    }
    np.savez(path, **random_inception, **extra)
    variables = inception.load_weights(str(path))
    assert set(variables) == {"params", "batch_stats"}
    back = inception.to_arrays(variables)
    assert set(back) == set(random_inception)
    for name, value in random_inception.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    assert kernel.shape == (1, 7, 128, 128)  # HWIO


def test_a_damaged_weight_file_is_named(random_inception, tmp_path):
    with pytest.raises(FileNotFoundError, match="no Inception weight file at"):
        inception.load_weights(str(tmp_path / "absent.npz"))
    partial = dict(random_inception)
    del partial["Mixed_7c.branch_pool.bn.bias"]
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(ValueError, match=r"lacks 1 of the 470 .*Mixed_7c.branch_pool"):
        inception.load_weights(str(tmp_path / "partial.npz"))
    wrong = dict(random_inception)
    wrong["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 3, 1), np.float32)
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(
        ValueError,
        match=re.escape("'Conv2d_1a_3x3.conv.weight'")
        + r".* shape \(32, 3, 3, 1\), expected \(32, 3, 3, 3\)",
    ):
        inception.load_weights(str(tmp_path / "wrong.npz"))


@pytest.fixture(scope="module")
def extractor(random_inception):
    variables = inception._to_variables(random_inception)
    return fid.FeatureExtractor(variables, batch_size=5)


def test_features_in_padded_sharded_batches_equal_one_pass(extractor):
    assert extractor.batch_size == 6  # rounded up to the 2 devices
    images = np.random.default_rng(9).uniform(-1, 1, (7, 16, 16, 3))
    features = extractor(images)
    assert features.shape == (7, 2048)
    one_pass = inception.InceptionFeatures().apply(
        extractor.variables, jnp.asarray(fid.as_8bit(images))
    )
    np.testing.assert_allclose(features, one_pass, rtol=1e-5, atol=1e-4)
    assert np.std(features, axis=0).mean() > 0.01


def test_weights_and_batches_are_placed_whole_on_each_device_or_split():
    mesh = sharding.make_mesh()
    batch = np.arange(12.0).reshape(4, 3)
    weights = {"w": np.arange(6.0).reshape(2, 3)}
    split = sharding.put_whole(batch, sharding.batch_sharding(mesh))
    whole = sharding.put_whole(weights, sharding.replicated(mesh))["w"]
    assert [s.data.shape for s in split.addressable_shards] == [(2, 3), (2, 3)]
    np.testing.assert_array_equal(split.addressable_shards[1].data, batch[2:])
    assert len(whole.addressable_shards) == 2 and whole.sharding.is_fully_replicated
    for shard in whole.addressable_shards:
        np.testing.assert_array_equal(shard.data, weights["w"])
    scalar = sharding.put_whole(np.float32(2), sharding.replicated(mesh))
    assert scalar.shape == () and float(scalar) == 2.0
    with pytest.raises(ValueError, match=r"shape \(\) cannot be placed as"):
        sharding.put_whole(np.float32(2), sharding.batch_sharding(mesh))


def test_images_are_measured_as_an_8bit_file_holds_them():
    levels = np.arange(256) / 127.5 - 1.0
    np.testing.assert_allclose(fid.as_8bit(levels), levels, atol=1e-7)
    values = np.array([-3.0, -1.0, 0.0, 0.003, 0.0041, 1.0, 1.5])
    levels = np.array([0, 0, 128, 128, 128, 255, 255])  # 0 is 127.5, rounded to even
    np.testing.assert_allclose(fid.as_8bit(values), levels / 127.5 - 1, atol=1e-7)


def test_grey_images_are_seen_as_equal_colour_channels(extractor):
    grey = np.random.default_rng(10).uniform(-1, 1, (2, 16, 16, 1))
    np.testing.assert_array_equal(
        extractor(grey), extractor(np.repeat(grey, 3, axis=-1))
    )
    with pytest.raises(ValueError, match=r"shape \(2, 16, 16, 2\)"):
        extractor(np.zeros((2, 16, 16, 2)))


def test_fid_metrics_compare_with_the_ground_truth_or_given_statistics(
    extractor, tmp_path
):
    rng = np.random.default_rng(11)
    truth = rng.uniform(-1, 1, (4, 16, 16, 3))
    other = rng.uniform(-1, 1, (4, 16, 16, 3))
    setup = fid_eval.FidSetup(extractor, None, "ground truth")
    metrics = fid_eval.measure(setup, truth, same=truth, other=other)
    assert metrics["fid_same"] == pytest.approx(0, abs=1e-6)
    assert metrics["fid_other"] > 0.1
    assert (metrics["fid_reference"], metrics["fid_images"]) == ("ground truth", 4)

    # The truth's own statistics, saved and loaded, give the same numbers.
    fid.save_statistics(tmp_path / "s.npz", extractor.statistics(truth))
    given = fid_eval.FidSetup(extractor, fid.load_statistics(tmp_path / "s.npz"), "s")
    again = fid_eval.measure(given, truth[:2], other=other)
    assert again["fid_other"] == pytest.approx(metrics["fid_other"], rel=1e-9)
    assert again["fid_images"] == 2


def test_damaged_statistics_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FID statistics file"):
        fid.load_statistics(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "a.npz", mu=np.zeros(2048))
    with pytest.raises(ValueError, match=r"lacks 1 of the 2 .*\['sigma'\] \(it holds"):
        fid.load_statistics(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"mu \(64,\) and sigma \(64, 64\), expected"):
        fid.load_statistics(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="'mu' holds non-finite values"):
        fid.load_statistics(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "d.npz", mu=np.zeros(2048), sigma=-np.eye(2048))
    with pytest.raises(ValueError, match=r"sigma in .* negative eigenvalue \(-1,"):
        fid.load_statistics(str(tmp_path / "d.npz"))


def _damaged_files(folder):
    """name -> path of files that are not usable .npz archives of numbers."""
    np.savez(folder / "good.npz", mu=np.zeros(3), sigma=np.eye(3))
    data = (folder / "good.npz").read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"mu,sigma\n1,2\n",
    }
    for name, content in files.items():
        (folder / f"{name}.npz").write_bytes(content)
    np.save(folder / "single.npy", np.zeros(3))
    np.savez(folder / "strings.npz", mu=np.array(["x"] * 3), sigma=np.eye(3))
    np.savez(folder / "objects.npz", mu=np.array([None] * 3), sigma=np.eye(3))
    np.savez(folder / "complex.npz", mu=np.zeros(3) + 1j, sigma=np.eye(3))
    return {
        "truncated": "is not a readable .npz archive",
        "empty": "is not a readable .npz archive",
        "text": "is not a readable .npz archive",
        "single": "holds one array (.npy), expected an .npz archive",
        "strings": "'mu' is damaged or not an array of real numbers",
        "objects": "'mu' is damaged or not an array of real numbers",
        "complex": "'mu' is damaged or not an array of real numbers",
    }


def test_unreadable_files_are_named_with_what_was_expected(tmp_path):
    for name, words in _damaged_files(tmp_path).items():
        path = tmp_path / (f"{name}.npy" if name == "single" else f"{name}.npz")
        with pytest.raises(ValueError, match=re.escape(words)) as caught:
            fid.load_statistics(str(path))
        assert str(path) in str(caught.value) and "FID statistics" in str(caught.value)
        with pytest.raises(ValueError, match="Inception weight file"):
            inception.load_weights(str(path))


def test_a_weight_file_with_non_finite_values_is_refused(random_inception, tmp_path):
    broken = dict(random_inception)
    broken["Mixed_6c.branch1x1.bn.running_var"] = np.full(192, np.nan, np.float32)
    np.savez(tmp_path / "nan.npz", **broken)
    name = "'Mixed_6c.branch1x1.bn.running_var'"
    with pytest.raises(ValueError, match=re.escape(name) + " holds non-finite"):
        inception.load_weights(str(tmp_path / "nan.npz"))


def test_a_zero_running_variance_is_a_usable_weight(random_inception, tmp_path):
    weights = dict(random_inception)
    weights["Mixed_6c.branch1x1.bn.running_var"] = np.zeros(192, np.float32)
    np.savez(tmp_path / "zero.npz", **weights)
    variables = inception.load_weights(str(tmp_path / "zero.npz"))
    stats = variables["batch_stats"]["Mixed_6c"]["branch1x1"]["bn"]
    np.testing.assert_array_equal(stats["var"], np.zeros(192))


@pytest.mark.parametrize(
    "name, value, words",
    [
        (
            "Mixed_6c.branch1x1.bn.running_var",
            np.full(192, -0.5, np.float32),
            "holds a negative variance (-0.5)",
        ),
        (
            "Mixed_6c.branch1x1.conv.weight",
            np.full((192, 768, 1, 1), 1e39),
            "holds values too large for float32 (largest magnitude 1e+39)",
        ),
        (
            "Mixed_6c.branch1x1.bn.bias",
            np.zeros(192, np.int8),
            "is damaged or not an array of floating-point numbers (it holds int8)",
        ),
    ],
)
def test_a_weight_file_the_network_cannot_use_is_refused_when_read(
    random_inception, tmp_path, name, value, words
):
    broken = dict(random_inception)
    broken[name] = value
    np.savez(tmp_path / "bad.npz", **broken)
    with pytest.raises(
        ValueError, match=re.escape(f"{name!r}") + ".*" + re.escape(words)
    ):
        inception.load_weights(str(tmp_path / "bad.npz"))


def test_features_equal_pytorch_fid_on_the_same_weights(random_inception):
    """Against the PyTorch FID package (installed with the ``reference`` extra).

    The package's network loads our weights strictly (every name, no other),
    through its download hook; both then see the same 32x32 images.
    """
    pytorch_fid = pytest.importorskip("pytorch_fid.inception")
    torch = pytest.importorskip("torch")
    state = {name: torch.from_numpy(v) for name, v in random_inception.items()}
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    for name in random_inception:
        if name.endswith("bn.running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    hook = pytorch_fid.load_state_dict_from_url
    pytorch_fid.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        network = pytorch_fid.InceptionV3(
            [3], resize_input=True, normalize_input=False, use_fid_inception=True
        ).eval()
    finally:
        pytorch_fid.load_state_dict_from_url = hook
    images = np.random.default_rng(12).uniform(-1, 1, (3, 32, 32, 3))
    with torch.no_grad():
        nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
        expected = network(nchw)[0][:, :, 0, 0].numpy()
    ours = inception.InceptionFeatures().apply(
        inception._to_variables(random_inception), jnp.asarray(images, jnp.float32)
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    # What tells the images apart agrees too, not just the common part.
    spread = np.std(expected, axis=0).mean()
    assert spread > 0.01
    np.testing.assert_allclose(
        ours - np.mean(ours, axis=0),
        expected - expected.mean(axis=0),
        atol=0.01 * spread,
    )


def _convert(*args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-m", "launch.convert_inception", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_converter_refuses_bad_paths_in_one_line(tmp_path):
    absent = str(tmp_path / "absent.pth")
    result = _convert(f"--input={absent}", f"--output={tmp_path / 'w.npz'}")
    assert one_line_error(result) == f"error: --input {absent!r} is not a file"
    result = _convert(f"--input={absent}", f"--output={tmp_path / 'w.txt'}")
    assert "must end in .npz" in one_line_error(result)
    assert "--input is required" in one_line_error(_convert("--output=w.npz"))
    result = _convert(f"--input={absent}", f"--output={tmp_path}/absent/w.npz")
    assert one_line_error(result) == (
        f"error: --output '{tmp_path}/absent/w.npz': its folder does not exist"
    )
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "w.pth").write_bytes(b"not read")
    result = _convert(
        f"--input={tmp_path / 'w.pth'}", f"--output={tmp_path}/folder.npz"
    )
    assert one_line_error(result) == (
        f"error: --output '{tmp_path}/folder.npz' is a folder, expected the name "
        "of the .npz file to write"
    )


def test_the_converted_file_replaces_the_output_whole_with_usual_permissions(
    random_inception, tmp_path, monkeypatch
):
    from launch import convert_inception

    monkeypatch.setattr(
        convert_inception, "read_state_dict", lambda path: dict(random_inception)
    )
    out = str(tmp_path / "w.npz")
    np.savez(out, old=np.arange(3))
    assert convert_inception.convert("w.pth", out) == len(random_inception)
    np.savez(tmp_path / "plain.npz", x=np.arange(3))
    assert os.stat(out).st_mode == os.stat(tmp_path / "plain.npz").st_mode
    assert sorted(os.listdir(tmp_path)) == ["plain.npz", "w.npz"]  # no leftovers
    back = inception.to_arrays(inception.load_weights(out))
    for name, value in back.items():
        np.testing.assert_array_equal(value, random_inception[name], err_msg=name)

    # A state dict that is not the network leaves the earlier file as it was.
    broken = dict(random_inception)
    del broken["Mixed_7c.branch_pool.bn.bias"]
    monkeypatch.setattr(convert_inception, "read_state_dict", lambda path: broken)
    with pytest.raises(ValueError, match="is not the FID Inception: it lacks 1"):
        convert_inception.convert("w.pth", out)
    assert inception.to_arrays(inception.load_weights(out)).keys() == back.keys()
    assert sorted(os.listdir(tmp_path)) == ["plain.npz", "w.npz"]


def test_the_converter_without_pytorch_says_how_to_get_it(tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed")
    (tmp_path / "w.pth").write_bytes(b"not read")
    result = _convert(f"--input={tmp_path / 'w.pth'}", f"--output={tmp_path / 'w.npz'}")
    assert one_line_error(result) == (
        "error: reading a .pth file needs PyTorch: pip install torch"
    )


def test_the_converter_turns_a_state_dict_into_the_weight_file(
    random_inception, tmp_path
):
    torch = pytest.importorskip("torch")
    state = {name: torch.from_numpy(v) for name, v in random_inception.items()}
    state["fc.weight"] = torch.zeros(1008, 2048)
    torch.save(state, tmp_path / "w.pth")
    result = _convert(f"--input={tmp_path / 'w.pth'}", f"--output={tmp_path / 'w.npz'}")
    assert result.returncode == 0, result.stderr[-2000:]
    back = inception.to_arrays(inception.load_weights(str(tmp_path / "w.npz")))
    for name, value in random_inception.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    # Half precision is widened to float32.
    half = {name: value.to(torch.bfloat16) for name, value in state.items()}
    torch.save(half, tmp_path / "half.pth")
    half_path, out = tmp_path / "half.pth", tmp_path / "h.npz"
    result = _convert(f"--input={half_path}", f"--output={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert inception.load_weights(str(tmp_path / "h.npz"))["params"]  # loads

    # A failed conversion names the input and leaves the output as it was.
    del state["Mixed_6a.branch3x3.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    before = (tmp_path / "w.npz").read_bytes()
    partial = str(tmp_path / "partial.pth")
    result = _convert(f"--input={partial}", f"--output={tmp_path / 'w.npz'}")
    assert one_line_error(result).startswith(
        f"error: --input {partial!r} is not the FID Inception: it lacks 1 of the 470"
    )
    assert (tmp_path / "w.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["h.npz", "w.npz"]

    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    torch.save(state["fc.weight"], tmp_path / "tensor.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for name, words in [
        ("wrapped", "maps 'state_dict' to a dict, expected a state dict of name"),
        ("tensor", "holds a Tensor, expected a state dict"),
        ("text", "cannot be read as a PyTorch file"),
    ]:
        result = _convert(f"--input={tmp_path / name}.pth", f"--output={out}")
        assert words in one_line_error(result), name


def test_super_resolution_is_compared_with_its_upsampled_low_resolution_image():
    from configs import base

    x1 = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    config = base.get_config()
    config.coupling.name = "superres"
    config.coupling.factor = 2
    upsampled = fid_eval.baselines(config, x1)["upsampled"]
    # Each 2x2 block becomes its mean: rows 0-1, columns 0-1 of image 0 hold
    # 0, 1, 4, 5.
    np.testing.assert_allclose(upsampled[0, :2, :2, 0], np.full((2, 2), 2.5))
    np.testing.assert_allclose(upsampled[1, 2:, 2:, 0], np.full((2, 2), 16 + 12.5))
    config.coupling.name = "independent"
    config.coupling.baseline_condition = "superres"
    assert set(fid_eval.baselines(config, x1)) == {"upsampled"}
    config.coupling.name = "inpainting"
    config.coupling.baseline_condition = "none"
    assert fid_eval.baselines(config, x1) == {}
    # The baseline's condition is read for the uncoupled baseline only.
    config.coupling.baseline_condition = "superres"
    assert fid_eval.baselines(config, x1) == {}


def test_in_painting_and_its_uncoupled_baseline_are_compared_with_mean_fill():
    from configs import base

    x1 = np.asarray(jax.random.uniform(jax.random.key(0), (2, 4, 4, 3)), np.float32)
    config = base.get_config()
    config.coupling.grid = 2
    for name, condition in (("inpainting", "none"), ("independent", "inpainting")):
        config.coupling.name = name
        config.coupling.baseline_condition = condition
        coupling = couplings.from_config(config.coupling)
        sample = coupling(jax.random.key(1), jnp.asarray(x1))
        mask = np.asarray(sample.cond[..., :1])  # the mask channel of both
        got = fid_eval.baselines(config, x1, sample)
        assert set(got) == {"mean_fill"}
        np.testing.assert_array_equal(got["mean_fill"], evaluate.mean_fill(x1, mask))
        assert 0 < mask.mean() < 1
