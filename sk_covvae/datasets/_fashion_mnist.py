"""Loader for Fashion-MNIST from the four standard gzipped IDX files."""

import gzip
import os
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

#: Where Debian's package ``dataset-fashion-mnist`` installs the files.
DEFAULT_FASHION_MNIST_HOME = "/usr/share/datasets/fashion-mnist"
#: Environment variable overriding :data:`DEFAULT_FASHION_MNIST_HOME`.
FASHION_MNIST_ENV = "SK_COVVAE_FASHION_MNIST"

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
TARGET_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_DESCR_PATH = Path(__file__).parent / "descr" / "fashion_mnist.rst"


def _fashion_mnist_home(data_home):
    if data_home is not None:
        return Path(data_home).expanduser()
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_FASHION_MNIST_HOME)


def _find(home, stem):
    for name in (stem + ".gz", stem):
        path = home / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {home}. Install Debian's "
        "package with `apt-get install -y dataset-fashion-mnist` (files in "
        f"{DEFAULT_FASHION_MNIST_HOME}), or point to a folder holding the four "
        "IDX files with the data_home argument or the environment variable "
        f"{FASHION_MNIST_ENV}."
    )


def _read_idx(path, ndim):
    """Read an IDX file (big-endian header: magic 0x0000080<ndim>, then sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic number {magic:#x}, expected {0x800 + ndim:#x})."
        )
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: header announces shape {shape} but holds "
            f"{data.size} bytes of data."
        )
    return data.reshape(shape)


def load_fashion_mnist(data_home=None, *, return_X_y=False):
    """Load Fashion-MNIST (70,000 grey-scale 28x28 images of 10 clothing classes).

    Reads the four standard gzipped IDX files; nothing is downloaded. They are
    looked for in ``data_home`` if given, else in the folder named by the
    environment variable ``SK_COVVAE_FASHION_MNIST``, else in
    ``/usr/share/datasets/fashion-mnist/``, where Debian's package
    ``dataset-fashion-mnist`` installs them
    (``apt-get install -y dataset-fashion-mnist``).

    =================   ==============
    Classes                         10
    Samples per class             7000
    Samples total                70000
    Dimensionality                 784
    Features            float32, [0, 1]
    =================   ==============

    Parameters
    ----------
    data_home : str or path-like, default=None
        Folder holding ``train-images-idx3-ubyte.gz``,
        ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
        ``t10k-labels-idx1-ubyte.gz`` (uncompressed files without ``.gz``
        also work).
    return_X_y : bool, default=False
        If True, return ``(data, target)`` instead of a Bunch.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the following attributes.

        data : ndarray of shape (70000, 784), float32
            Pixel intensities divided by 255, rows flattened row-major. The
            first 60,000 rows are the official training set, the last 10,000
            the official test set.
        target : ndarray of shape (70000,), int64
            Class labels 0-9.
        images : ndarray of shape (70000, 28, 28), float32
            The same pixels as images (a view of ``data``).
        target_names : ndarray of shape (10,), str
            Class names, ``'T-shirt/top'`` ... ``'Ankle boot'``.
        train_index, test_index : ndarray of int
            Row indices of the official split: ``arange(60000)`` and
            ``arange(60000, 70000)``.
        image_shape : tuple
            ``(28, 28)``.
        DESCR : str
            Description of the data set.

    (data, target) : tuple if ``return_X_y`` is True
        ``data`` and ``target`` as above.

    Raises
    ------
    FileNotFoundError
        When a file is missing; the message names the install command and
        the overrides.

    References
    ----------
    .. [1] Xiao, Rasul & Vollgraf (2017), "Fashion-MNIST: a Novel Image
       Dataset for Benchmarking Machine Learning Algorithms",
       arXiv:1708.07747.

    Examples
    --------
    >>> from sk_covvae.datasets import load_fashion_mnist
    >>> fmnist = load_fashion_mnist()  # doctest: +SKIP
    >>> fmnist.data.shape, fmnist.data.dtype  # doctest: +SKIP
    ((70000, 784), dtype('float32'))
    >>> X_train = fmnist.data[fmnist.train_index]  # doctest: +SKIP
    """
    home = _fashion_mnist_home(data_home)
    paths = {key: _find(home, stem) for key, stem in _FILES.items()}
    train_labels = _read_idx(paths["train_labels"], 1)
    images = np.concatenate(
        [_read_idx(paths["train_images"], 3), _read_idx(paths["test_images"], 3)]
    )
    labels = np.concatenate([train_labels, _read_idx(paths["test_labels"], 1)]).astype(
        np.int64
    )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files in {home} disagree: {images.shape[0]} images "
            f"but {labels.shape[0]} labels."
        )
    n_train = train_labels.shape[0]
    n = images.shape[0]
    data = images.reshape(n, -1).astype(np.float32)
    data /= np.float32(255.0)
    if return_X_y:
        return data, labels
    return Bunch(
        data=data,
        target=labels,
        images=data.reshape(images.shape),
        target_names=np.array(TARGET_NAMES),
        train_index=np.arange(n_train),
        test_index=np.arange(n_train, n),
        image_shape=images.shape[1:],
        DESCR=_DESCR_PATH.read_text(encoding="utf-8"),
    )
