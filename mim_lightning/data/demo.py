"""The embedded default dataset: natural photos shipped inside scikit-image (no download).

They are written once, as PNG files no larger than ``max_side`` pixels, to a cache folder and then
read through :class:`~mim_lightning.data.sources.ImageFolderSource` like any user folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from mim_lightning.data.sources import ImageFolderSource, Sample

#: scikit-image's bundled photos and textures (``skimage.data``), all loadable offline.
DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "colorwheel",
)


def default_cache_dir() -> Path:
    base = os.environ.get("MIM_LIGHTNING_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mim_lightning")
    return Path(base).expanduser() / "demo"


def _photos() -> dict[str, np.ndarray]:
    from skimage import data as skdata

    photos = {}
    for name in DEMO_PHOTOS:
        image = getattr(skdata, name)()
        if name == "stereo_motorcycle":
            photos["motorcycle_left"], photos["motorcycle_right"] = image[0], image[1]
            continue
        photos[name] = image
    return photos


def write_demo_photos(folder: Path, max_side: int = 256) -> list[Path]:
    """Write the demo photos (RGB PNG, longer side ``max_side``) into ``folder`` atomically; idempotent."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, array in _photos().items():
        target = folder / f"{name}.png"
        written.append(target)
        if target.exists():
            continue
        image = Image.fromarray(np.asarray(array)).convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, target)
    return written


class DemoSource(ImageFolderSource):
    """The demo photos (17 images) as a folder source; ``cache_dir`` defaults to
    ``$MIM_LIGHTNING_CACHE/demo`` or ``~/.cache/mim_lightning/demo``."""

    demo = True

    def __init__(self, cache_dir: str | None = None, max_side: int = 256) -> None:
        self.folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.max_side = max_side
        super().__init__(str(self.folder), key="data.source.cache_dir")

    def describe(self) -> str:
        return f"demo photos ({len(DEMO_PHOTOS) + 1} images from scikit-image)"

    def samples(self) -> list[Sample]:
        expected = len(DEMO_PHOTOS) + 1
        if not self.folder.is_dir() or len(list(self.folder.glob("*.png"))) < expected:
            write_demo_photos(self.folder, self.max_side)
        return super().samples()
