"""Tests of the data layer: embedded domains, cache, external loaders, tensors, contact sheet."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ntp_ssl.data import (
    EMBEDDED_DOMAINS,
    TORCHVISION_DOMAINS,
    Domain,
    ImageArrayDataset,
    default_cache_dir,
    load_domain,
    normalize_stats,
    to_float_tensor,
    write_contact_sheet,
)
from ntp_ssl.data import cache, embedded, syndigits
from ntp_ssl.data.ops import to_grey
from ntp_ssl.errors import ConfigError, DataError, NtpSslError

SIZE = 16  # small images keep the suite fast
EXPECTED_SIZES = {"mnist": (4000, 1000), "syndigits": (5000, 1250), "mnistm": (4000, 1000)}


def _hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() for im in images}


def _assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Domain]:
    cache_dir = tmp_path_factory.mktemp("cache")
    return {name: load_domain(name, image_size=SIZE, cache_dir=cache_dir) for name in EMBEDDED_DOMAINS}


@pytest.fixture
def small_syndigits(monkeypatch):
    """Fewer rendered digits, for tests that build syndigits several times."""
    monkeypatch.setattr(syndigits, "TRAIN_SIZE", 200)
    monkeypatch.setattr(syndigits, "TEST_SIZE", 50)


# --------------------------------------------------------------------------- embedded domains


@pytest.mark.parametrize("name", EMBEDDED_DOMAINS)
def test_embedded_domain_shapes_labels_and_balance(domains, name):
    d = domains[name]
    assert d.name == name and d.num_classes == 10 and (d.image_size, d.channels) == (SIZE, 3)
    for images, labels in ((d.train_images, d.train_labels), (d.test_images, d.test_labels)):
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10 and counts.min() > 0
        assert counts.min() >= 0.9 * counts.max()
        assert images.std() > 10  # not blank
    if name in EXPECTED_SIZES:
        assert (len(d.train_labels), len(d.test_labels)) == EXPECTED_SIZES[name]
    else:  # optdigits: 1,797 digits split about 80/20
        assert len(d.train_labels) + len(d.test_labels) == 1797
        assert 0.18 < len(d.test_labels) / 1797 < 0.22
    info = d.describe()
    assert info["train_size"] == len(d.train_labels) and sum(info["test_per_class"]) == len(d.test_labels)
    assert info["image_size"] == SIZE and info["channels"] == 3 and info["name"] == name


@pytest.mark.parametrize("name", EMBEDDED_DOMAINS)
def test_embedded_train_and_test_share_no_sample(domains, name):
    d = domains[name]
    assert not _hashes(d.train_images) & _hashes(d.test_images)
    assert len(_hashes(d.train_images)) == len(d.train_images)  # no duplicates inside a split either
    if name in ("mnist", "mnistm"):  # and no underlying MNIST digit on both sides
        train, test = embedded.mnist_split(0)
        source, _ = embedded.mnist_source()
        assert not set(train.tolist()) & set(test.tolist())
        assert not _hashes(source[train]) & _hashes(source[test])
        assert len(train) + len(test) == len(source)


@pytest.mark.parametrize("name", EMBEDDED_DOMAINS)
def test_generation_is_deterministic_per_seed(name, small_syndigits):
    build = embedded.BUILDERS[name]
    first, again, other = build(0, 8, 3), build(0, 8, 3), build(1, 8, 3)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(first, key), getattr(again, key))
    assert not np.array_equal(first.train_images, other.train_images)
    if name != "optdigits":  # optdigits' split changes with the seed; its pixels cannot
        assert not np.array_equal(first.test_images, other.test_images)


def test_mnistm_uses_the_mnist_split(domains):
    mnist, mnistm = domains["mnist"], domains["mnistm"]
    assert np.array_equal(mnist.train_labels, mnistm.train_labels)
    assert np.array_equal(mnist.test_labels, mnistm.test_labels)
    # |patch - digit|: where the digit is black the output is the photo, so it is colourful there
    assert mnistm.train_images.reshape(-1, 3).std(axis=0).min() > 20


def test_channels_one_matches_luminance_and_replication(tmp_path):
    grey = load_domain("mnist", image_size=SIZE, channels=1, cache_dir=tmp_path)
    rgb = load_domain("mnist", image_size=SIZE, channels=3, cache_dir=tmp_path)
    assert grey.channels == 1 and grey.train_images.shape[1:] == (SIZE, SIZE, 1)
    assert np.array_equal(np.repeat(grey.train_images, 3, axis=-1), rgb.train_images)
    grey_m = load_domain("mnistm", image_size=SIZE, channels=1, cache_dir=tmp_path)
    rgb_m = load_domain("mnistm", image_size=SIZE, channels=3, cache_dir=tmp_path)
    assert np.array_equal(grey_m.test_images, to_grey(rgb_m.test_images))


def test_domain_arrays_are_read_only(domains):
    with pytest.raises(ValueError):
        domains["mnist"].train_images[0, 0, 0, 0] = 1


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_without_rebuilding(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ntp_ssl.data")
    first = load_domain("optdigits", image_size=SIZE, cache_dir=tmp_path)
    path = cache.cache_path(tmp_path, "optdigits", SIZE, 3, 0)
    assert path.is_file() and "built domain optdigits" in caplog.text
    mtime = path.stat().st_mtime_ns

    def fail(*args):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setitem(embedded.BUILDERS, "optdigits", fail)
    caplog.clear()
    second = load_domain("optdigits", image_size=SIZE, cache_dir=tmp_path)
    assert "loaded domain optdigits" in caplog.text
    assert path.stat().st_mtime_ns == mtime
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(first, key), getattr(second, key))
    assert second.class_names == first.class_names
    assert list(path.parent.glob(".tmp-*")) == []


def test_cache_key_separates_settings(tmp_path):
    paths = {
        cache.cache_path(tmp_path, "mnist", 32, 3, 0),
        cache.cache_path(tmp_path, "mnist", 28, 3, 0),
        cache.cache_path(tmp_path, "mnist", 32, 1, 0),
        cache.cache_path(tmp_path, "mnist", 32, 3, 1),
        cache.cache_path(tmp_path, "mnistm", 32, 3, 0),
    }
    assert len(paths) == 5
    assert f"v{cache.GENERATOR_VERSION}" in next(iter(paths)).name


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a zip file")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite(path: Path, edit) -> None:  # load a valid npz, edit its arrays in place, save it valid again
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    edit(arrays)
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _tamper(path: Path) -> None:  # a valid npz whose pixels no longer match the stored checksum
    def flip_first_image(arrays):
        arrays["train_images"] = arrays["train_images"].copy()
        arrays["train_images"][0] ^= 0xFF
    _rewrite(path, flip_first_image)


def _relabel(path: Path) -> None:  # a consistent hand edit of the labelling: class names and count agree
    def rename_classes(arrays):
        meta = json.loads(str(arrays["meta"][()]))
        meta["class_names"] = [f"renamed {name}" for name in meta["class_names"]]
        arrays["meta"] = np.array(json.dumps(meta))
    _rewrite(path, rename_classes)


@pytest.mark.parametrize("corrupt", [_garbage, _truncate, _tamper, _relabel],
                         ids=["garbage", "truncated", "tampered", "relabelled"])
def test_corrupted_cache_entry_is_rebuilt(tmp_path, corrupt, caplog):
    original = load_domain("optdigits", image_size=SIZE, cache_dir=tmp_path)
    path = cache.cache_path(tmp_path, "optdigits", SIZE, 3, 0)
    corrupt(path)
    caplog.set_level(logging.WARNING, logger="ntp_ssl.data")
    rebuilt = load_domain("optdigits", image_size=SIZE, cache_dir=tmp_path)
    assert "unusable" in caplog.text
    assert np.array_equal(rebuilt.train_images, original.train_images)
    assert rebuilt.class_names == original.class_names
    assert cache.read_cached(path, "optdigits", SIZE, 3, 0) is not None  # rewritten and valid again


def test_concurrent_builds_share_one_valid_entry(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: load_domain("optdigits", image_size=8, cache_dir=tmp_path), range(2)))
    assert np.array_equal(results[0].train_images, results[1].train_images)
    folder = cache.cache_path(tmp_path, "optdigits", 8, 3, 0).parent
    assert [p.name for p in folder.iterdir()] == [cache.cache_path(tmp_path, "optdigits", 8, 3, 0).name]


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NTP_SSL_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("NTP_SSL_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "ntp-ssl"


# --------------------------------------------------------------------------- settings and names


@pytest.mark.parametrize("size", [0, -3, 7, 513, 32.0, "32", True, None])
def test_bad_image_size_is_a_config_error(size, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_domain("mnist", image_size=size, cache_dir=tmp_path)
    _assert_one_line(exc, "image_size", repr(size))


@pytest.mark.parametrize("channels", [0, 2, 4, "3"])
def test_bad_channels_is_a_config_error(channels, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_domain("mnist", channels=channels, cache_dir=tmp_path)
    _assert_one_line(exc, "channels", "1 or 3")


def test_bad_seed_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_domain("mnist", seed=-1, cache_dir=tmp_path)
    _assert_one_line(exc, "seed", "-1")


def test_unknown_domain_lists_valid_names(tmp_path):
    with pytest.raises(DataError) as exc:
        load_domain("mnits", cache_dir=tmp_path)
    _assert_one_line(exc, "'mnits'", "did you mean 'mnist'", "folder:", "npz:", *EMBEDDED_DOMAINS, *TORCHVISION_DOMAINS)
    assert isinstance(exc.value, NtpSslError)


def test_numpy_integer_settings_are_accepted(domains, tmp_path):
    d = load_domain("mnist", image_size=np.int64(SIZE), channels=np.int32(3), seed=np.int64(0), cache_dir=tmp_path)
    assert np.array_equal(d.train_images, domains["mnist"].train_images)
    assert cache.cache_path(tmp_path, "mnist", SIZE, 3, 0).is_file()


def test_names_are_case_insensitive(domains, tmp_path):
    d = load_domain(" MNIST ", image_size=SIZE, cache_dir=tmp_path)
    assert d.name == "mnist" and np.array_equal(d.train_images, domains["mnist"].train_images)


# --------------------------------------------------------------------------- npz


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_domain_with_seeded_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 10, 12), dtype=np.uint8)
    y = np.repeat(np.arange(5), 10)
    path = _npz(tmp_path / "d.npz", x=x, y=y)
    d = load_domain(f"npz:{path}", image_size=8, seed=3)
    assert d.train_images.shape == (40, 8, 8, 3) and d.test_images.shape == (10, 8, 8, 3)
    assert d.num_classes == 5 and np.bincount(d.test_labels).tolist() == [2] * 5
    again = load_domain(f"npz:{path}", image_size=8, seed=3)
    other = load_domain(f"npz:{path}", image_size=8, seed=4)
    assert np.array_equal(d.train_labels, again.train_labels) and np.array_equal(d.train_images, again.train_images)
    assert not np.array_equal(d.train_images, other.train_images)


def test_npz_domain_with_its_own_test_split(tmp_path):
    x = np.zeros((6, 8, 8, 3), np.uint8)
    path = _npz(tmp_path / "d.npz", x=x, y=np.arange(6) % 3, x_test=x[:2, ..., :1], y_test=np.array([0, 2], np.int32))
    d = load_domain(f"npz:{path}", image_size=8, channels=1)
    assert d.train_images.shape == (6, 8, 8, 1) and d.test_images.shape == (2, 8, 8, 1)
    assert d.test_labels.dtype == np.int64 and d.num_classes == 3


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        (None, "does not exist"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(2, int)}, "['x']"),
        ({"x": np.zeros((2, 8, 8), np.uint8)}, "['y']"),
        ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.zeros(2, int)}, "2 labels but 'x' has 3 images"),
        ({"x": np.zeros((2, 8, 8), np.float32), "y": np.zeros(2, int)}, "must be uint8"),
        ({"x": np.zeros((2, 8, 8, 4), np.uint8), "y": np.zeros(2, int)}, "(N, H, W, 1|3)"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, -1])}, "negative label"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(2, int), "x_test": np.zeros((1, 8, 8), np.uint8)},
         "x_test / y_test"),
        ("not an npz", "cannot read"),
        ({"x": np.array([np.zeros((8, 8)), np.zeros((9, 9))], dtype=object), "y": np.zeros(2, int)},
         "holds object arrays (pickled Python objects), which are never loaded"),
    ],
    ids=["missing-file", "no-x", "no-y", "length-mismatch", "float", "4-channels", "negative", "half-test", "not-zip",
         "object-array"],
)
def test_npz_bad_inputs_are_data_errors(tmp_path, arrays, fragment):
    path = tmp_path / "bad.npz"
    if isinstance(arrays, dict):
        _npz(path, **arrays)
    elif isinstance(arrays, str):
        path.write_text(arrays)
    with pytest.raises(DataError) as exc:
        load_domain(f"npz:{path}", image_size=8)
    _assert_one_line(exc, fragment)


# --------------------------------------------------------------------------- image folder


def _make_folder(root: Path, classes=("cat", "dog", "eel"), per_class=5) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode, shape = [("RGB", (12, 20, 3)), ("L", (9, 9)), ("RGBA", (16, 10, 4))][i % 3]
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).save(root / name / f"{i}.png")
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


def test_folder_domain_with_seeded_split(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    d = load_domain(f"folder:{root}", image_size=8, seed=0)
    assert d.class_names == ("cat", "dog", "eel") and d.num_classes == 3
    assert d.train_images.shape == (12, 8, 8, 3) and d.test_images.shape == (3, 8, 8, 3)
    assert np.bincount(d.test_labels).tolist() == [1, 1, 1]
    grey = load_domain(f"folder:{root}", image_size=8, channels=1)
    assert grey.train_images.shape[-1] == 1


def test_folder_domain_with_train_and_test_subfolders(tmp_path):
    _make_folder(tmp_path / "ds" / "train")
    _make_folder(tmp_path / "ds" / "test", classes=("cat", "eel"), per_class=2)
    d = load_domain(f"folder:{tmp_path / 'ds'}", image_size=8)
    assert len(d.train_labels) == 15 and len(d.test_labels) == 4
    assert sorted(set(d.test_labels.tolist())) == [0, 2]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError) as exc:
        load_domain(f"folder:{tmp_path / 'nope'}")
    _assert_one_line(exc, "does not exist", "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        load_domain(f"folder:{tmp_path / 'empty'}")
    _assert_one_line(exc, "has no images", ".png")
    root = _make_folder(tmp_path / "broken", classes=("a",), per_class=2)
    (root / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError) as exc:
        load_domain(f"folder:{root}")
    _assert_one_line(exc, "cannot read image", "x.png")


# --------------------------------------------------------------------------- torchvision


def test_torchvision_missing_dataset_says_how_to_fix(tmp_path):
    for name in ("cifar10", "tv-mnist"):
        with pytest.raises(DataError) as exc:
            load_domain(name, root=str(tmp_path / "none"), cache_dir=tmp_path)
        _assert_one_line(exc, name, "data.root=", "data.download=true")


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_torchvision_mnist_from_local_root(tmp_path):
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    d = load_domain("tv-mnist", root=str(tmp_path / "tv"), image_size=16, channels=3)
    assert d.train_images.shape == (20, 16, 16, 3) and d.test_images.shape == (10, 16, 16, 3)
    assert d.num_classes == 10 and d.train_labels.dtype == np.int64


# --------------------------------------------------------------------------- tensors and datasets


def test_normalize_stats_and_float_tensor():
    assert normalize_stats(3) == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert normalize_stats(1) == {"mean": [0.5], "std": [0.5]}
    with pytest.raises(ConfigError):
        normalize_stats(2)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0] = 255
    t = to_float_tensor(images)
    assert t.shape == (2, 3, 4, 4) and t.dtype == torch.float32
    assert torch.all(t[0] == 1) and torch.all(t[1] == -1)
    assert to_float_tensor(images[0]).shape == (3, 4, 4)


def test_image_array_dataset(domains):
    d = domains["mnist"]
    ds = ImageArrayDataset(d.train_images, d.train_labels)
    x, y = ds[3]
    assert len(ds) == len(d.train_labels) and x.shape == (3, SIZE, SIZE) and y == int(d.train_labels[3])
    assert torch.allclose(x, to_float_tensor(d.train_images[3:4])[0])
    seen = []
    grey = ImageArrayDataset(d.train_images[..., :1], d.train_labels, transform=lambda im: seen.append(im.mode) or 0)
    assert grey[0] == (0, int(d.train_labels[0])) and seen == ["L"]
    rgb = ImageArrayDataset(d.train_images, d.train_labels, transform=lambda im: im.mode)
    assert rgb[0][0] == "RGB"
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, SIZE, SIZE)
    with pytest.raises(DataError):
        ImageArrayDataset(d.train_images, d.train_labels[:-1])


def test_domain_validates_its_arrays():
    images = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(DataError) as exc:
        Domain("x", images, np.array([0, 1, 2, 5]), images, np.zeros(4, int), num_classes=3)
    _assert_one_line(exc, "[0, 2]")
    with pytest.raises(DataError):
        Domain("x", images.astype(np.float32), np.zeros(4, int), images, np.zeros(4, int), num_classes=1)
    with pytest.raises(DataError):
        Domain("x", images, np.zeros(4, int), np.zeros((4, 9, 9, 1), np.uint8), np.zeros(4, int), num_classes=1)


# --------------------------------------------------------------------------- contact sheet


def test_contact_sheet_png(domains, tmp_path):
    rng = np.random.default_rng(0)
    tiny = Domain("tiny-grey", rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8), np.arange(9) % 3,
                  np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64), num_classes=3)
    path = write_contact_sheet([*domains.values(), tiny], tmp_path / "sheets" / "domains.png", per_class=2)
    assert path == tmp_path / "sheets" / "domains.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert width > 10 * 2 * 32 and height > 5 * 32
    assert pixels.std() > 30 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["domains.png"]
    with pytest.raises(ConfigError):
        write_contact_sheet(list(domains.values()), tmp_path / "x.png", per_class=0)
    with pytest.raises(DataError):
        write_contact_sheet([], tmp_path / "x.png")


def test_the_validation_split_holds_out_train_images_and_never_reads_the_test_split(tmp_path):
    """data.split=validation: the measured split is a stratified fifth of the train split, the
    rest is trained on, and not one test image is left (settings chosen there never saw it)."""
    from types import SimpleNamespace

    from ntp_ssl.data import load_domains_for
    from ntp_ssl.data.load import VALIDATION_FRACTION

    rng = np.random.default_rng(0)
    x, x_test = rng.integers(0, 255, (100, 16, 16), dtype=np.uint8), rng.integers(0, 255, (30, 16, 16), dtype=np.uint8)
    y = np.repeat(np.arange(4), 25)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x_test, y_test=np.arange(30) % 4)

    def load(split):
        data = SimpleNamespace(image_size=16, channels=3, seed=0, root=None, download=False, train_limit=0,
                               test_limit=0, split=split)
        return load_domains_for(SimpleNamespace(data=data, paths=SimpleNamespace(cache_dir=str(tmp_path / "c"))),
                                [f"npz:{tmp_path / 'd.npz'}"])[0]

    full, held = load(None), load("validation")
    assert len(held.test_labels) == VALIDATION_FRACTION * 100 and len(held.train_labels) == 80
    assert np.bincount(held.test_labels).tolist() == [5, 5, 5, 5]  # stratified
    rows = {img.tobytes(): i for i, img in enumerate(full.train_images)}  # every image of x is distinct
    fit = {rows[img.tobytes()] for img in held.train_images}
    val = {rows[img.tobytes()] for img in held.test_images}
    assert not fit & val and len(fit | val) == 100  # a partition of the train split
    test = {img.tobytes() for img in full.test_images}
    assert not test & {img.tobytes() for img in (*held.train_images, *held.test_images)}
    np.testing.assert_array_equal(load("validation").test_images, held.test_images)  # the same every time
    np.testing.assert_array_equal(load("test").test_images, full.test_images)


def test_a_limit_on_a_split_smaller_than_the_class_count_keeps_that_split_whole():
    """data.test_limit below the class count on a test split of fewer images than classes: the
    split is kept as it is (a limit is raised to one image per class, which this split cannot
    give), not an error about a "subset size" the user never set; a larger split is still cut."""
    from ntp_ssl.data.load import limit_domain

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    small_test = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    domain = Domain("few-test", train, np.arange(40) % 10, small_test, np.arange(6), num_classes=10)
    limited = limit_domain(domain, train_limit=3, test_limit=3, seed=0)
    np.testing.assert_array_equal(limited.test_images, small_test)
    np.testing.assert_array_equal(limited.test_labels, np.arange(6))
    assert len(limited.train_labels) == 10  # raised to one per class, and drawn
    assert sorted(limited.train_labels.tolist()) == list(range(10))
