"""Shared fixtures: tiny sizes, no network, seeded."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path_factory, monkeypatch):
    torch.manual_seed(0)
    np.random.seed(0)
    cache = tmp_path_factory.getbasetemp() / "mim_cache"
    monkeypatch.setenv("MIM_LIGHTNING_CACHE", str(cache))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(root: Path, count: int, size: int = 48, seed: int = 0, prefix: str = "img", ext: str = "png") -> list[Path]:
    """Smooth random colour images (learnable structure, not pure noise)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        freq = rng.uniform(1, 4, size=3)
        phase = rng.uniform(0, 6.28, size=3)
        image = np.stack([0.5 + 0.5 * np.sin(6.28 * f * (xx + yy * (c + 1) / 3) + p)
                          for c, (f, p) in enumerate(zip(freq, phase))], axis=-1)
        path = root / f"{prefix}_{i:03d}.{ext}"
        Image.fromarray((image * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """24 images in nested folders (recursion), with a non-image file beside them."""
    root = tmp_path / "images"
    write_images(root / "a", 12, seed=1, prefix="a")
    write_images(root / "b" / "deeper", 12, seed=2, prefix="b", ext="jpg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def class_folder(tmp_path) -> Path:
    root = tmp_path / "classes"
    for label, name in enumerate(["cat", "dog", "emu"]):
        write_images(root / name, 6, seed=10 + label, prefix=name)
    return root


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU run of the default pipeline at 32px."""
    return [
        "backbone=vit_test",
        "trainer=cpu",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.repeat=2",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        f"run_dir={run_dir}",
        *extra,
    ]


class StopAfterEpoch:
    """A callback (used via ``+callbacks.stop._target_=conftest.StopAfterEpoch``) that ends training
    after ``epoch`` epochs, as an interruption would, without changing the run's schedule."""

    def __new__(cls, epoch: int = 1):
        from lightning.pytorch.callbacks import Callback

        class _Stop(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch + 1 >= epoch:
                    trainer.should_stop = True

        return _Stop()


class SignalAtStep:
    """A callback (``+callbacks.sig._target_=conftest.SignalAtStep``) that sends ``signal`` to its own
    process when ``global_step`` reaches ``step`` (a kill -9, SIGTERM or SIGUSR1 in the middle of a run)."""

    def __new__(cls, step: int, signal: str = "SIGKILL"):
        import os
        import signal as signals

        from lightning.pytorch.callbacks import Callback

        class _Signal(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), getattr(signals, signal))

        return _Signal()


class RecordIndices:
    """A callback (``+callbacks.record._target_=conftest.RecordIndices +callbacks.record.path=DIR``) that
    writes the ``index`` of every training sample each rank saw to ``DIR/rank<k>.json``."""

    def __new__(cls, path: str):
        import json

        from lightning.pytorch.callbacks import Callback

        class _Record(Callback):
            def __init__(self):
                self.seen: list[int] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.seen.extend(int(i) for i in batch["index"])

            def on_train_end(self, trainer, pl_module):
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))

        return _Record()


class RaiseAtStep:
    """A callback (``+callbacks.crash._target_=conftest.RaiseAtStep``) that raises RuntimeError when
    ``global_step`` reaches ``step``: an in-process crash between two optimizer steps."""

    def __new__(cls, step: int):
        from lightning.pytorch.callbacks import Callback

        class _Raise(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    raise RuntimeError(f"simulated crash at step {step}")

        return _Raise()


def write_idx_split(folder: Path, images_name: str, labels_name: str, count: int, seed: int) -> None:
    """Fashion-MNIST-layout idx files (gzip, big-endian headers): ``count`` 28x28 images, labels cycling 0-9."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.uint8) % 10
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.stack([((np.sin((xx + yy * (label + 1)) / (label + 2)) + 1) * 100
                        + rng.integers(0, 50, (28, 28))).astype(np.uint8) for label in labels])
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / images_name, "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
    with gzip.open(folder / labels_name, "wb") as handle:
        handle.write(struct.pack(">II", 2049, count) + labels.tobytes())


@pytest.fixture
def fashion_mnist_raw(tmp_path) -> Path:
    """A miniature Fashion-MNIST package folder: 60 train and 20 test images in the idx layout."""
    root = tmp_path / "fashion-mnist"
    write_idx_split(root, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60, seed=0)
    write_idx_split(root, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 20, seed=1)
    return root


def make_datamodule(source, batch_size: int = 4, val_fraction: float = 0.1, **kwargs):
    """A set-up ``PretrainDataModule`` over ``source`` at 32 px with MAE's mask (tiny, no workers, seed 0)."""
    from mim_lightning.data import PretrainDataModule
    from mim_lightning.masking import RandomMask

    options = dict(image_size=32, batch_size=batch_size, num_workers=0, val_fraction=val_fraction, seed=0,
                   mask_generator=RandomMask(32, 8, 0.75))
    options.update(kwargs)
    dm = PretrainDataModule(source, **options)
    dm.setup("fit")
    return dm
