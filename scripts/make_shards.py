"""Turn a folder of images into WebDataset tar shards for ``data=webdataset``, plus their wids index.

    python scripts/make_shards.py /data/imagenet/train /data/in1k-shards --maxcount 5000
    python scripts/make_shards.py /data/imagenet/train /data/in1k-shards --labels   # root/<class>/*.jpg

Images are stored byte for byte (no re-encoding), in a seeded random order (so each shard is a mix
of the whole folder; ``--no-shuffle`` keeps the sorted order), ``--maxcount`` per shard, as
``<prefix>-000000.tar`` ..., written by ``webdataset.ShardWriter``, then ``shardindex.json`` (the wids
shard index: samples per shard). With ``--labels`` each sample also gets ``<key>.cls`` (the class index in
sorted sub-folder order) and the index lists the class names and each shard's labels. Aim for shards of equal size and a
shard count divisible by (GPUs x data.num_workers): every device then reads whole epochs.
Unreadable files are left out (listed on stderr) unless ``--keep-unreadable``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of images (recursive), or root/<class>/... with --labels")
    parser.add_argument("output", help="folder for the shards (created)")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    parser.add_argument("--labels", action="store_true", help="one sub-folder per class: store labels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    parser.add_argument("--keep-unreadable", action="store_true", help="do not open the images to check them")
    args = parser.parse_args(argv)

    from mim_lightning.data.datasets import load_rgb
    from mim_lightning.data.sources import ClassFolderSource, ImageFolderSource
    from mim_lightning.data.shards import INDEX, write_shards
    from mim_lightning.errors import ConfigError

    if args.maxcount < 1:
        print(f"make_shards: error: --maxcount={args.maxcount}: expected a positive integer", file=sys.stderr)
        return 2
    source = (ClassFolderSource if args.labels else ImageFolderSource)(args.folder, key="folder")
    try:
        samples = source.samples()
        classes = source.classes
    except ConfigError as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    pairs = [(s.path, s.label) for s in samples]
    if not args.keep_unreadable:
        readable = []
        for path, label in pairs:
            try:
                load_rgb(path)
                readable.append((path, label))
            except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is left out
                print(f"make_shards: skipping unreadable {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        pairs = readable
    if not pairs:
        print(f"make_shards: error: no readable images in {args.folder}", file=sys.stderr)
        return 2
    if not args.no_shuffle:
        order = np.random.default_rng(args.seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
    written = write_shards(pairs, args.output, prefix=args.prefix, maxcount=args.maxcount, classes=classes)
    print(f"wrote {len(pairs)} samples in {len(written)} shards to {args.output} (index {Path(args.output) / INDEX})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
