"""Fashion-MNIST (Zalando): 28x28 grey clothing images, 10 classes, same IDX format as MNIST."""

from __future__ import annotations

from pathlib import Path

from qexp.data.mnist import IdxSpec, MnistLike

# Installed by the Debian/Ubuntu package dataset-fashion-mnist. Module-level so tests can
# point it elsewhere.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_SPEC = IdxSpec(
    name="fashion_mnist",
    title="Fashion-MNIST",
    tv_name="FashionMNIST",
    env_subdirs=("fashion-mnist", "fashion_mnist"),
    mean=0.2860,
    std=0.3530,
    install_hint="or `apt-get install dataset-fashion-mnist`",
)


class FashionMNIST(MnistLike):
    """Fashion-MNIST: 60000 train (before the val carve) and 10000 test images.

    Files are looked for in dataset.root, $QEXP_DATA, /usr/share/datasets/fashion-mnist, the
    download cache, then downloaded if allowed. See `MnistLike` for the options.
    """

    spec = FASHION_MNIST_SPEC

    def system_dirs(self) -> list[Path]:
        return [DEBIAN_DIR]  # looked up at call time, so monkeypatching the constant works
