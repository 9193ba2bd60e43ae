import numpy as np
import pytest

from npas_serve.data import load_dataset
from npas_serve.data.base import cache_dir
from npas_serve.errors import UserError


# --- mnist1d ----------------------------------------------------------------------------------------

def test_mnist1d_standard_split(npas_cache):
    d = load_dataset("mnist1d")
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40)
    assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.num_classes == 10 and set(np.unique(d.y_train)) == set(range(10))
    assert cache_dir() == npas_cache
    assert (npas_cache / "mnist1d-seed42.npz").is_file()


def test_mnist1d_is_read_from_the_cache_and_stable(monkeypatch):
    first = load_dataset("mnist1d")
    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("mnist1d was generated again instead of read from the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load_dataset("mnist1d", seed=42)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)


def test_mnist1d_other_seed_gives_other_data(npas_cache):
    a, b = load_dataset("mnist1d"), load_dataset("mnist1d", seed=1)
    assert b.x_train.shape == a.x_train.shape
    assert not np.array_equal(a.x_train, b.x_train)
    assert (npas_cache / "mnist1d-seed1.npz").is_file()


# --- digits -----------------------------------------------------------------------------------------

def test_digits_split_80_20_stratified():
    d = load_dataset("digits")
    assert len(d.x_train) + len(d.x_test) == 1797
    assert len(d.x_test) == 360 and d.x_train.shape[1:] == (8, 8)
    total = np.bincount(np.concatenate([d.y_train, d.y_test]), minlength=10)
    test = np.bincount(d.y_test, minlength=10)
    assert np.all(np.abs(test - 0.2 * total) <= 1)      # every class held out in proportion
    assert load_dataset("digits", seed=0).y_test.tolist() == d.y_test.tolist()
    assert load_dataset("digits", seed=1).y_test.tolist() != d.y_test.tolist()


# --- npz --------------------------------------------------------------------------------------------

def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_good_npz_loads_with_a_seeded_holdout(good_npz):
    d = load_dataset(str(good_npz))
    assert len(d.x_train) == 160 and len(d.x_test) == 40 and d.input_shape == (40,)
    assert d.num_classes == 3
    again = load_dataset(str(good_npz))
    np.testing.assert_array_equal(d.y_test, again.y_test)
    other = load_dataset(str(good_npz), seed=5)
    assert not np.array_equal(d.x_test, other.x_test)


def test_npz_with_its_own_test_split(tmp_path):
    x, y = np.ones((10, 4)), np.arange(10) % 2
    path = write(tmp_path / "d.npz", x=x, y=y, x_test=x[:3], y_test=y[:3])
    d = load_dataset(path)
    assert len(d.x_train) == 10 and len(d.x_test) == 3


def test_npz_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(UserError, match="not a readable .npz"):
        load_dataset(str(path))


def test_npz_pickled_object_arrays_are_not_loaded(tmp_path):
    path = write(tmp_path / "obj.npz", x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))
    with pytest.raises(UserError, match="obj.npz is not a readable .npz"):
        load_dataset(path)


@pytest.mark.parametrize("arrays, problem", [
    ({"x": np.ones((10, 4))}, r"lacks array\(s\) \['y'\]"),
    ({"x": np.ones((10, 4)), "y": np.zeros(9)}, "same length"),
    ({"x": np.full((10, 4), np.nan), "y": np.arange(10) % 2}, "NaN"),
    ({"x": np.ones((10, 4)), "y": np.arange(10) % 2 - 1}, r"labels must lie in \[0, "),
    ({"x": np.ones((10, 4)), "y": np.arange(10) * 0.5}, "integers"),
    ({"x": np.ones(10), "y": np.arange(10) % 2}, "shape"),
    ({"x": np.ones((10, 4)), "y": np.zeros(10)}, "2 classes"),
])
def test_npz_bad_contents_name_the_problem(tmp_path, arrays, problem):
    path = write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=problem) as info:
        load_dataset(path)
    assert "bad.npz" in str(info.value)


def test_npz_labels_beyond_num_classes(good_npz):
    assert load_dataset(str(good_npz), num_classes=5).num_classes == 5
    with pytest.raises(UserError, match=r"\[0, 1\], found 0..2"):
        load_dataset(str(good_npz), num_classes=2)


def test_with_channels_adds_the_channel_axis(good_npz):
    d = load_dataset(str(good_npz))
    c = d.with_channels(1)
    assert c.x_train.shape == (160, 1, 40) and c.x_test.shape == (40, 1, 40)
    np.testing.assert_array_equal(c.x_train[:, 0], d.x_train)
    assert c.with_channels(1).x_train.shape == (160, 1, 40)     # already has channels: unchanged
    digits = load_dataset("digits").with_channels(2)
    assert digits.x_train.shape[1:] == (1, 8, 8)
    with pytest.raises(UserError, match="2-D signals"):
        d.with_channels(2)


def test_normalisation_is_fitted_on_the_training_split(good_npz):
    d = load_dataset(str(good_npz))
    norm = d.normalisation()
    z = norm.apply(d.x_train)
    assert z.dtype == np.float32
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4


@pytest.mark.parametrize("shape", [(40,), (2, 40), (8, 8), (3, 8, 8)])
def test_npz_examples_of_any_shape_load_as_they_are(tmp_path, shape):
    rng = np.random.default_rng(0)
    path = write(tmp_path / "any.npz", x=rng.standard_normal((30, *shape)), y=np.arange(30) % 3)
    assert load_dataset(path).input_shape == shape


def test_shaped_as_adds_only_the_channel_axis_of_one(good_npz):
    d = load_dataset(str(good_npz))
    assert d.shaped_as((40,)) is d
    assert d.shaped_as([1, 40]).x_test.shape == (40, 1, 40)
    with pytest.raises(UserError, match=r"shape \(40,\); the model takes \(2, 20\)"):
        d.shaped_as((2, 20))


def test_synthetic_cifar_is_cifar_shaped_seeded_and_learnable_by_its_class_means():
    a, b = load_dataset("synthetic-cifar"), load_dataset("synthetic-cifar")
    assert a.input_shape == (3, 32, 32) and a.num_classes == 10 and (len(a.x_train), len(a.x_test)) == (1000, 200)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    means = np.stack([a.x_train[a.y_train == c].mean(0) for c in range(10)])
    nearest = ((a.x_test[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4)).argmin(1)
    assert (nearest == a.y_test).mean() > 0.9          # the classes are there to learn, under the noise
