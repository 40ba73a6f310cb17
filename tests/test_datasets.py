"""Tests for smallchains.datasets.

Real-data tests look for the data root in $SMALLCHAINS_DATA, else in
``<repo>/../shared/datasets``, and are skipped (with the reason) if neither
has the files. Run: ``PYTHONPATH=. pytest tests/test_datasets.py``.
"""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from smallchains import datasets
from smallchains.datasets import _cifar10, _files, _mnist

REPO = Path(__file__).resolve().parent.parent


def _shared_root():
    env = os.environ.get("SMALLCHAINS_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "datasets")


SHARED = _shared_root()
HAVE_MNIST = all((SHARED / "mnist" / n).is_file() for n in _mnist.FILES)
HAVE_CIFAR = all((SHARED / "cifar10" / n).is_file()
                 for n in _cifar10._TRAIN + ("test_batch_first1000.bin",))
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST, reason=f"MNIST files not found in {SHARED / 'mnist'} "
    "(set SMALLCHAINS_DATA to the folder holding mnist/)")
needs_cifar = pytest.mark.skipif(
    not HAVE_CIFAR, reason=f"CIFAR-10 files not found in {SHARED / 'cifar10'} "
    "(set SMALLCHAINS_DATA to the folder holding cifar10/)")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No SMALLCHAINS_DATA, cache dir inside tmp_path."""
    monkeypatch.delenv("SMALLCHAINS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------
# synthetic IDX files (no real data needed)

def write_idx_gz(path, arr, magic=None):
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 0x0800 + arr.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A 5-image MNIST test split in tmp_path/src with checksums patched in."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx_gz(src / "t10k-images-idx3-ubyte.gz", images)
    write_idx_gz(src / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setitem(_mnist._SPLIT_FILES, "test",
                        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 5))
    for n in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        monkeypatch.setitem(_mnist.FILES, n, ("sha256", sha256(src / n)))
    return src, images, labels


def test_fake_mnist_parse(fake_mnist):
    src, images, labels = fake_mnist
    x, y = datasets.mnist("test", data_dir=src)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[:, 0], images / 255.0, rtol=1e-6)
    assert x[0, 0, 0, 0] == 0.0 and x[0, 0, 0, 1] == 1.0


@pytest.mark.parametrize("bad", ["magic", "dims", "length"])
def test_bad_idx_rejected(fake_mnist, monkeypatch, bad):
    src, images, _ = fake_mnist
    p = src / "t10k-images-idx3-ubyte.gz"
    if bad == "magic":
        write_idx_gz(p, images, magic=0x0D03)  # float data code, not ubyte
    elif bad == "dims":
        write_idx_gz(p, images.reshape(5, 14, 56))
    else:
        with gzip.open(p, "wb") as f:
            f.write((0x0803).to_bytes(4, "big") + b"".join(
                d.to_bytes(4, "big") for d in (5, 28, 28)) + images.tobytes()[:-1])
    monkeypatch.setitem(_mnist.FILES, p.name, ("sha256", sha256(p)))
    with pytest.raises(ValueError, match={"magic": "magic", "dims": "dimensions",
                                          "length": "payload"}[bad]):
        datasets.mnist("test", data_dir=src)


# --------------------------------------------------------------------------
# real MNIST

@needs_mnist
@pytest.mark.parametrize("split,n,first,counts", [
    ("train", 60000, [5, 0, 4, 1, 9],
     [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
    ("test", 10000, [7, 2, 1, 0, 4],
     [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
])
def test_mnist_real(monkeypatch, split, n, first, counts):
    monkeypatch.setenv("SMALLCHAINS_DATA", str(SHARED))
    x, y = datasets.mnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32
    assert x.flags.c_contiguous
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert list(y[:5]) == first
    assert np.bincount(y, minlength=10).tolist() == counts
    # every value is k/255 for an integer k
    k = x[:100] * 255
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    # same result with an explicit directory
    x2, y2 = datasets.mnist(split, data_dir=SHARED / "mnist")
    np.testing.assert_array_equal(y, y2)


@needs_mnist
def test_mnist_cache_is_read_only():
    x, y = datasets.mnist("test", data_dir=SHARED / "mnist")
    assert not x.flags.writeable and not y.flags.writeable
    with pytest.raises(ValueError):
        x[0, 0, 0, 0] = 5.0
    with pytest.raises(ValueError):
        y[0] = 3
    x2, y2 = datasets.mnist("test", data_dir=SHARED / "mnist")
    assert x2 is x and y2 is y  # served from the in-process cache
    assert y2[0] == 7


@needs_mnist
def test_mnist_checksum_mismatch(tmp_path):
    for n in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(SHARED / "mnist" / n, tmp_path / n)
        os.chmod(tmp_path / n, 0o644)
    datasets.mnist("test", data_dir=tmp_path)  # intact copy loads
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(p.read_bytes())
    data[-20] ^= 0xFF
    p.write_bytes(bytes(data))
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # defeat coarse mtime
    with pytest.raises(datasets.ChecksumError) as ei:
        datasets.mnist("test", data_dir=tmp_path)
    msg = str(ei.value)
    expected = _mnist.FILES[p.name][1]
    assert str(p) in msg and expected in msg and sha256(p) in msg
    assert isinstance(ei.value, ValueError)


# --------------------------------------------------------------------------
# directory resolution and missing files

def test_bad_split():
    for f in (datasets.mnist, datasets.cifar10):
        with pytest.raises(ValueError, match="train.*test"):
            f("validation")


def test_data_dir_resolution(clean_env, monkeypatch):
    tmp = clean_env
    assert datasets.data_dir("mnist") == tmp / "xdg" / "smallchains" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp / "home"))
    assert datasets.data_dir("cifar10") == tmp / "home" / ".cache" / "smallchains" / "cifar10"
    monkeypatch.setenv("SMALLCHAINS_DATA", str(tmp / "root"))
    assert datasets.data_dir("mnist") == tmp / "root" / "mnist"
    assert datasets.data_dir("mnist", tmp / "explicit") == tmp / "explicit"


def test_missing_explicit_dir_message(clean_env):
    missing = clean_env / "nowhere"
    with pytest.raises(FileNotFoundError) as ei:
        datasets.mnist("train", data_dir=missing)
    msg = str(ei.value)
    for part in (str(missing), "SMALLCHAINS_DATA", "download=True", "data_dir",
                 "train-images-idx3-ubyte.gz"):
        assert part in msg, part
    assert not missing.exists()  # offline lookup creates nothing


def test_missing_env_dir_message(clean_env, monkeypatch):
    root = clean_env / "root"
    monkeypatch.setenv("SMALLCHAINS_DATA", str(root))
    with pytest.raises(FileNotFoundError) as ei:
        datasets.mnist("test")
    assert str(root / "mnist") in str(ei.value)
    assert "SMALLCHAINS_DATA" in str(ei.value)
    with pytest.raises(FileNotFoundError) as ei:
        datasets.cifar10("train")
    msg = str(ei.value)
    assert str(root / "cifar10") in msg and "SMALLCHAINS_DATA" in msg
    assert "cifar-10-binary.tar.gz" in msg and "download=True" not in msg


def test_missing_default_cache_message(clean_env):
    with pytest.raises(FileNotFoundError) as ei:
        datasets.mnist("test")
    msg = str(ei.value)
    assert str(clean_env / "xdg" / "smallchains" / "mnist") in msg
    assert "SMALLCHAINS_DATA" in msg


# --------------------------------------------------------------------------
# download through a local HTTP server

@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www over HTTP on localhost; yields (dir, base_url)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _serve(www, sub, files):
    d = www / sub
    d.mkdir()
    for f in files:
        shutil.copy(f, d / Path(f).name)
    return d


def test_download_fallback_to_second_mirror(fake_mnist, http_root, tmp_path, monkeypatch):
    src, _, labels = fake_mnist
    www, base = http_root
    (www / "empty").mkdir()
    _serve(www, "good", src.iterdir())
    monkeypatch.setattr(_mnist, "MIRRORS", [f"{base}/empty/", f"{base}/good/"])
    dest = tmp_path / "dest" / "mnist"
    with pytest.raises(FileNotFoundError):
        datasets.mnist("test", data_dir=dest)  # download=False never fetches
    x, y = datasets.mnist("test", data_dir=dest, download=True)
    np.testing.assert_array_equal(y, labels)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in src.iterdir())
    # already present: no new fetch (server emptied)
    shutil.rmtree(www / "good")
    datasets.mnist("test", data_dir=dest, download=True)


def test_download_wrong_checksum_leaves_nothing(fake_mnist, http_root, tmp_path, monkeypatch):
    src, _, _ = fake_mnist
    www, base = http_root
    bad = _serve(www, "bad", src.iterdir())
    for p in bad.iterdir():
        p.write_bytes(p.read_bytes() + b"tampered")
    monkeypatch.setattr(_mnist, "MIRRORS", [f"{base}/bad/"])
    dest = tmp_path / "dest"
    with pytest.raises(datasets.DownloadError) as ei:
        datasets.mnist("test", data_dir=dest, download=True)
    msg = str(ei.value)
    assert "checksum mismatch" in msg and f"{base}/bad/" in msg
    assert _mnist.FILES["t10k-images-idx3-ubyte.gz"][1] in msg
    assert list(dest.iterdir()) == []  # no partial or temp file


def test_download_interrupted_leaves_nothing(fake_mnist, tmp_path, monkeypatch):
    def broken_fetch(url, out, timeout=60.0):
        out.write(b"\x1f\x8b partial")
        raise ConnectionResetError("connection dropped")

    monkeypatch.setattr(_files, "_fetch", broken_fetch)
    monkeypatch.setattr(_mnist, "MIRRORS", ["http://mirror-a.invalid/", "http://mirror-b.invalid/"])
    dest = tmp_path / "dest"
    with pytest.raises(datasets.DownloadError) as ei:
        datasets.mnist("test", data_dir=dest, download=True)
    assert "mirror-a.invalid" in str(ei.value) and "mirror-b.invalid" in str(ei.value)
    assert "connection dropped" in str(ei.value)
    assert list(dest.iterdir()) == []


@needs_mnist
def test_download_real_files(http_root, tmp_path, monkeypatch):
    www, base = http_root
    _serve(www, "mnist", [SHARED / "mnist" / n for n in
                          ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")])
    monkeypatch.setattr(_mnist, "MIRRORS", [f"{base}/mnist/"])
    monkeypatch.setenv("SMALLCHAINS_DATA", str(tmp_path / "data"))
    x, y = datasets.mnist("test", download=True)
    assert x.shape == (10000, 1, 28, 28) and list(y[:5]) == [7, 2, 1, 0, 4]
    got = tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
    assert sha256(got) == _mnist.FILES[got.name][1]


# --------------------------------------------------------------------------
# CIFAR-10

@needs_cifar
def test_cifar10_train():
    x, y = datasets.cifar10("train", data_dir=SHARED / "cifar10")
    assert x.shape == (50000, 3, 32, 32) and x.dtype == np.float32
    assert x.flags.c_contiguous and not x.flags.writeable
    assert y.shape == (50000,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert np.bincount(y, minlength=10).tolist() == [5000] * 10
    # batch 1 class counts from SOURCES.md
    assert np.bincount(y[:10000], minlength=10).tolist() == [
        1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


@needs_cifar
def test_cifar10_test_partial_warns(monkeypatch):
    monkeypatch.setenv("SMALLCHAINS_DATA", str(SHARED))
    with pytest.warns(datasets.PartialDatasetWarning, match="1000"):
        x, y = datasets.cifar10("test")
    assert x.shape == (1000, 3, 32, 32) and x.dtype == np.float32
    assert np.bincount(y, minlength=10).tolist() == [
        103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


def test_cifar10_prefers_full_test_batch(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rec = rng.integers(0, 256, size=(7, 3073), dtype=np.uint8)
    rec[:, 0] = np.arange(7) % 10
    full = tmp_path / "test_batch.bin"
    full.write_bytes(rec.tobytes())
    (tmp_path / "test_batch_first1000.bin").write_bytes(b"ignored")
    monkeypatch.setitem(_cifar10.FILES, "test_batch.bin",
                        ("sha1", hashlib.sha1(full.read_bytes()).hexdigest()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = datasets.cifar10("test", data_dir=tmp_path)
    assert x.shape == (7, 3, 32, 32)
    np.testing.assert_array_equal(y, np.arange(7))
    np.testing.assert_allclose(x.reshape(7, -1), rec[:, 1:] / 255.0, rtol=1e-6)
    # the known SHA-1 of the official file is enforced
    monkeypatch.setitem(_cifar10.FILES, "test_batch.bin", ("sha1", "0" * 40))
    full.write_bytes(rec.tobytes()[:-3073])
    with pytest.raises(datasets.ChecksumError, match="sha1"):
        datasets.cifar10("test", data_dir=tmp_path)


# --------------------------------------------------------------------------
# matrix exponential

def test_matrix_exponential_vs_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    X, Y = datasets.matrix_exponential(3000, seed=123, dtype=np.float64)
    assert X.shape == Y.shape == (3000, 4) and X.dtype == Y.dtype == np.float64
    ref = np.stack([scipy_linalg.expm(a) for a in X.reshape(-1, 2, 2)]).reshape(-1, 4)
    np.testing.assert_allclose(Y, ref, rtol=1e-10, atol=1e-14)
    assert abs(X.mean()) < 0.05 and abs(X.std() - 1) < 0.05


@pytest.mark.parametrize("a", [
    [[0, 0], [0, 0]],            # exp = I
    [[0, 1], [0, 0]],            # nilpotent, s = 0 exactly
    [[2, 0], [0, 2]],            # scalar
    [[0, -np.pi], [np.pi, 0]],   # rotation by pi, s imaginary
    [[1, 1e-9], [-1e-9, 1]],     # s tiny, imaginary
    [[1e-5, 3e-5], [2e-5, -1e-5]],  # s tiny, real
    [[5, 3], [-4, -2]],          # cancellation on the diagonal
    [[10, -7], [3, 8]],
])
def test_expm2x2_edge_cases(a):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a = np.array(a, dtype=np.float64)
    got = datasets.expm2x2(a)
    ref = scipy_linalg.expm(a)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13 * np.abs(ref).max())


def test_matrix_exponential_seed_and_dtype():
    X1, Y1 = datasets.matrix_exponential(50, seed=7)
    X2, Y2 = datasets.matrix_exponential(50, seed=7)
    X3, _ = datasets.matrix_exponential(50, seed=8)
    assert X1.dtype == Y1.dtype == np.float32
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(Y1, Y2)
    assert not np.array_equal(X1, X3)
    # Y is the exponential of X exactly as returned (row-major flattening)
    ref = datasets.expm2x2(X1.astype(np.float64).reshape(-1, 2, 2)).reshape(-1, 4)
    np.testing.assert_allclose(Y1, ref.astype(np.float32), rtol=1e-6)
    X0, Y0 = datasets.matrix_exponential(0, seed=1)
    assert X0.shape == Y0.shape == (0, 4)


def test_matrix_exponential_bad_args():
    with pytest.raises(ValueError):
        datasets.matrix_exponential(-1)
    with pytest.raises(TypeError):
        datasets.matrix_exponential(2.5)
    with pytest.raises(ValueError):
        datasets.matrix_exponential(3, dtype=np.int32)


def test_expm2x2_layout():
    a = np.array([[0.0, 2.0], [0.0, 0.0]])  # exp = [[1, 2], [0, 1]]
    np.testing.assert_array_equal(datasets.expm2x2(a), [[1.0, 2.0], [0.0, 1.0]])


# --------------------------------------------------------------------------
# CIFAR-10: grayscale, the partial test set, bad files (small fake batches)

def _write_cifar(path, n, seed, labels=None):
    """n random records (1 label byte + 3072 pixel bytes) -> (records uint8 (n, 3073))."""
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, size=(n, 3073), dtype=np.uint8)
    rec[:, 0] = (np.arange(n) + seed) % 10 if labels is None else labels
    Path(path).write_bytes(rec.tobytes())
    return rec


def _patch_checksum(monkeypatch, path):
    monkeypatch.setitem(_cifar10.FILES, Path(path).name, ("sha256", sha256(path)))


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """Five 4-record training batches and a 3-record test_batch_first1000.bin in
    tmp_path/cifar, their checksums patched in; returns (dir, train records, test records)."""
    d = tmp_path / "cifar"
    d.mkdir()
    train = []
    for i, name in enumerate(_cifar10._TRAIN):
        rec = _write_cifar(d / name, 4, seed=i)
        train.append(rec)
        _patch_checksum(monkeypatch, d / name)
    train = np.concatenate(train)
    # exact extremes: an all-black and an all-white pixel
    test = np.zeros((3, 3073), dtype=np.uint8)
    test[:, 1:] = np.random.default_rng(9).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    test[:, 0] = [7, 0, 9]
    test[0, 1::1024] = 0
    test[1, 1::1024] = 255
    (d / "test_batch_first1000.bin").write_bytes(test.tobytes())
    _patch_checksum(monkeypatch, d / "test_batch_first1000.bin")
    return d, train, test


def _gray_reference(rec):
    rgb = rec[:, 1:].reshape(-1, 3, 32, 32).astype(np.float64)
    return rgb.sum(axis=1, keepdims=True) / 765.0


def test_cifar10_fake_train_rgb_and_grayscale(fake_cifar):
    d, train, _ = fake_cifar
    x, y = datasets.cifar10("train", data_dir=d)
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(y, train[:, 0])
    np.testing.assert_allclose(x.reshape(20, -1), train[:, 1:] / 255.0, rtol=1e-6)
    g, yg = datasets.cifar10("train", data_dir=d, grayscale=True)
    assert g.shape == (20, 1, 32, 32) and g.dtype == np.float32 and yg.dtype == np.int64
    assert g.flags.c_contiguous and not g.flags.writeable and not yg.flags.writeable
    np.testing.assert_array_equal(yg, y)
    # (R + G + B) / 765, rounded once to float32
    np.testing.assert_allclose(g, _gray_reference(train), rtol=6e-8, atol=0)
    np.testing.assert_allclose(g, x.mean(axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert 0.0 <= g.min() and g.max() <= 1.0
    # RGB and grayscale are cached separately, each served again from the cache
    assert datasets.cifar10("train", data_dir=d, grayscale=True)[0] is g
    assert datasets.cifar10("train", data_dir=d)[0] is x


def test_cifar10_partial_test_set_is_announced(fake_cifar):
    d, _, test = fake_cifar
    with pytest.warns(datasets.PartialDatasetWarning) as rec:
        g, y = datasets.cifar10("test", data_dir=d, grayscale=True)
    msg = str(rec[0].message)
    for part in ("PARTIAL", "no test_batch.bin", "first 1000 of the 10000", str(d),
                 "allow_partial=False"):
        assert part in msg, part
    assert g.shape == (3, 1, 32, 32)
    np.testing.assert_array_equal(y, [7, 0, 9])
    assert (g[0, 0, 0, 0], g[1, 0, 0, 0]) == (0.0, 1.0)  # black and white pixels exact
    np.testing.assert_allclose(g, _gray_reference(test), rtol=6e-8, atol=0)
    # allow_partial=False: an error naming the missing full file, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError) as ei:
            datasets.cifar10("test", data_dir=d, allow_partial=False)
    msg = str(ei.value)
    assert "Missing: test_batch.bin" in msg and str(d) in msg
    assert "cifar-10-binary.tar.gz" in msg


def test_cifar10_no_test_file_names_the_full_test_batch(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        datasets.cifar10("test", data_dir=tmp_path)
    msg = str(ei.value)
    assert "Missing: test_batch.bin." in msg and str(tmp_path) in msg
    assert "test_batch_first1000.bin" in msg and "PartialDatasetWarning" in msg  # the fallback
    assert "cifar-10-binary.tar.gz" in msg


def test_cifar10_missing_train_batch(fake_cifar):
    d, _, _ = fake_cifar
    (d / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        datasets.cifar10("train", data_dir=d)
    msg = str(ei.value)
    assert "Missing: data_batch_3.bin." in msg and str(d) in msg
    assert "data_batch_2.bin" not in msg


@pytest.mark.parametrize("bad,match", [
    ("truncated", r"size 12192 bytes is not a multiple of the 3073-byte CIFAR-10 record "
                  r"\(3 whole records and 2973 bytes left over\): the file is truncated"),
    ("extra", r"size 12297 bytes is not a multiple of the 3073-byte"),
    ("empty", r"the file is empty; expected records of 3073 bytes"),
    ("label", r"label 12 of record 2 is out of range 0\.\.9"),
])
def test_cifar10_malformed_batch(fake_cifar, monkeypatch, bad, match):
    """Files whose checksum matches (patched here) but whose content is malformed: the
    size and label checks name the file and say what is wrong."""
    d, train, _ = fake_cifar
    p = d / "data_batch_2.bin"
    data = p.read_bytes()
    if bad == "truncated":
        data = data[:-100]
    elif bad == "extra":
        data = data + b"\x00" * 5
    elif bad == "empty":
        data = b""
    else:
        rec = train[4:8].copy()
        rec[2, 0] = 12
        data = rec.tobytes()
    p.write_bytes(data)
    _patch_checksum(monkeypatch, p)
    with pytest.raises(ValueError, match=match) as ei:
        datasets.cifar10("train", data_dir=d)
    assert str(p) in str(ei.value)
    assert not isinstance(ei.value, datasets.ChecksumError)


def test_cifar10_truncated_file_fails_its_checksum(fake_cifar):
    """Without a patched checksum a truncated batch is caught by the checksum first."""
    d, _, _ = fake_cifar
    p = d / "data_batch_5.bin"
    expected = _cifar10.FILES[p.name][1]
    p.write_bytes(p.read_bytes()[:3073 * 2])
    with pytest.raises(datasets.ChecksumError) as ei:
        datasets.cifar10("train", data_dir=d)
    assert str(p) in str(ei.value) and expected in str(ei.value)


def test_cifar10_bad_flags(fake_cifar):
    d, _, _ = fake_cifar
    with pytest.raises(TypeError, match="grayscale must be a bool, got str"):
        datasets.cifar10("train", data_dir=d, grayscale="yes")
    with pytest.raises(TypeError, match="allow_partial must be a bool, got int"):
        datasets.cifar10("test", data_dir=d, allow_partial=0)
    with pytest.raises(TypeError):
        datasets.cifar10("train", d, True)  # grayscale is keyword-only


@needs_cifar
def test_cifar10_real_test_grayscale():
    d = SHARED / "cifar10"
    with pytest.warns(datasets.PartialDatasetWarning, match="no test_batch.bin"):
        x, y = datasets.cifar10("test", d)  # data_dir stays the second positional argument
    with pytest.warns(datasets.PartialDatasetWarning):
        g, yg = datasets.cifar10("test", data_dir=d, grayscale=True)
    assert g.shape == (1000, 1, 32, 32) and g.dtype == np.float32
    np.testing.assert_array_equal(yg, y)
    np.testing.assert_allclose(g, x.mean(axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert 0.0 <= g.min() and g.max() <= 1.0
    with pytest.raises(FileNotFoundError, match="Missing: test_batch.bin"):
        datasets.cifar10("test", data_dir=d, allow_partial=False)
