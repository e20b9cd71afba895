"""Draw a few masks of a mask configuration over demo photos, to choose ratio and unit by eye.

    python scripts/visualize_masks.py mask=simmim mask.ratio=0.6 data.image_size=192 backbone=vit_b --out masks.png

Takes the same Hydra overrides as ``python -m mim_lightning.train``; writes one row per image:
the image and four masked views (hidden pixels grey).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from PIL import Image

from mim_lightning import ConfigError, build_datamodule, build_mask_generator, compose
from mim_lightning.visualize import denormalize, mask_to_pixels, panels_to_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for mim_lightning.train")
    parser.add_argument("--out", default="masks.png", help="output PNG path")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--views", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        cfg = compose("pretrain", args.overrides)
        generator = build_mask_generator(cfg)
        datamodule = build_datamodule(cfg)
        datamodule.setup("fit")
    except ConfigError as error:
        print(f"mim_lightning: error: {error}", file=sys.stderr)
        return 2
    if generator is None:
        print("mim_lightning: error: mask=null has no generator to draw", file=sys.stderr)
        return 2
    dataset = datamodule.train_dataset
    rng = np.random.default_rng(int(cfg.seed))
    rows = []
    for index in range(min(args.images, len(dataset))):
        image = denormalize(dataset[(index, 0)]["images"][None], datamodule.mean, datamodule.std)
        panels = [image[0]]
        for _ in range(args.views):
            hidden = mask_to_pixels(torch.from_numpy(generator(rng))[None], image.shape[-2:])[0]
            panels.append(torch.where(hidden, torch.full_like(image[0], 0.5), image[0]))
        rows.append(torch.stack(panels))
    Image.fromarray(panels_to_grid(torch.stack(rows))).save(args.out)
    print(f"{generator!r}: applied ratio {generator.applied_ratio:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
