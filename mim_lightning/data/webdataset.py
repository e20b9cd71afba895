"""Tar-shard data (the WebDataset layout) for pretraining at scale: ``data=webdataset``.

A shard is a plain tar file; the members of one sample share a key (the path up to the first dot of
the file name) and differ by extension: ``000123.jpg`` (or png, webp, ...), optionally ``000123.cls``
(an integer label as text). ``scripts/make_shards.py`` writes such shards from a folder, plus a
``shards.json`` manifest with the number of samples per shard. Shards written by the ``webdataset``
package or by ``tar`` itself read the same way.

Why a small reader over :mod:`tarfile` rather than the ``webdataset`` package: every sample here needs a
stable global index (crops and masks are seeded by ``SeedSequence([seed, epoch, index])``, exactly as
for folder data), every rank must yield the same number of batches per epoch (DDP/FSDP hang
otherwise), and the position must be resumable mid-epoch. All three need the shard sizes and a
deterministic sample order, which the package's pipeline does not give; the reader is ~200 lines of the
standard library and adds no dependency.

How an epoch is read (``repeat`` passes over the shards, each a fresh permutation seeded by
``(seed, epoch, pass)``):

* the epoch's shard list is dealt round-robin to the ranks, and each rank's list round-robin to its
  DataLoader workers, so every shard is read by exactly one worker of one rank (disjoint samples; the
  union over ranks is the whole epoch when the ranks' batch counts come out equal, see below);
* each worker streams its shards through a shuffle buffer (``shuffle_buffer`` samples, raw bytes,
  seeded by ``(seed, epoch, rank, worker)``) and decodes only what it yields;
* every rank yields the same number of batches: the smallest full-batch count over the ranks (known
  from the shard sizes). Samples beyond it on a luckier rank are left out of that epoch (a different
  set each epoch, since the shard order changes); make shards of equal size (``make_shards`` does)
  with a shard count divisible by ``devices x num_workers`` and nothing is left out.

Resume: the position is (epoch, batches done), as for folder data. The shard order, the buffer draws
and the order in which the DataLoader takes batches from its workers (round-robin) are all
deterministic, so a mid-epoch resume re-reads the epoch's shards but skips, undecoded, exactly the
samples already trained on: the resumed run sees the same samples, crops and masks as one that never
stopped (with the same ``num_workers``; a different worker count changes the in-epoch order, never the
epoch boundaries). Workers are not persistent, so each epoch starts them with its own epoch number.

Shard locations (``data.urls``): a folder (all ``*.tar`` in it), a path or URL with brace patterns
(``/data/in22k/shard-{000000..001023}.tar``, ``https://host/in1k-{0000..0127}.tar``), several separated
by ``::``, or a list; ``pipe:COMMAND`` streams the command's stdout (``pipe:aws s3 cp s3://b/x.tar -``).
Shard sizes come from ``shards.json`` next to the shards (fetched the same way for URLs), or for local
files from reading the tar headers.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import tarfile
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from mim_lightning import runlog
from mim_lightning.data.datamodule import TrainPositionState, collate_batch_mask, union_count
from mim_lightning.data.datasets import ImageDataset, as_rgb, no_readable_images, transformed_item
from mim_lightning.data.sampler import EpochIndexSampler
from mim_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MIMTransform, eval_image_transform, pretrain_image_transform
from mim_lightning.errors import ConfigError
from mim_lightning.masking import MaskGenerator

MANIFEST = "shards.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
LABEL_EXTS = ("cls", "label")

Raw = dict[str, bytes]


# ----------------------------------------------------------------------------------------------------- urls


def braceexpand(pattern: str) -> list[str]:
    """Expand ``{000..012}`` ranges (zero-padded like the first bound) and ``{a,b}`` alternatives."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        low, high = span.group(1), span.group(2)
        width = len(low) if low.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in braceexpand(head + option + tail)]


def _is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "file://", "ftp://"))


def expand_urls(urls: str | Sequence[str] | None, key: str = "data.urls") -> list[str]:
    """The shard list: folders give their ``*.tar`` files (sorted), patterns are brace-expanded."""
    if urls is None or (isinstance(urls, str) and urls.strip() in ("", "???")):
        raise ConfigError(key, urls, "tar shards: a folder, a brace pattern like /data/shard-{000000..000099}.tar, "
                                     "URLs, or a list of them (scripts/make_shards.py writes shards)")
    parts = urls.split("::") if isinstance(urls, str) else [str(u) for u in urls]
    shards: list[str] = []
    for part in (p.strip() for p in parts if p.strip()):
        if not _is_remote(part):
            local = Path(os.path.expandvars(part)).expanduser()
            if local.is_dir():
                found = sorted(str(p) for p in local.glob("*.tar"))
                if not found:
                    raise ConfigError(key, part, "a folder containing .tar shards", "no .tar files in it")
                shards.extend(found)
                continue
            part = str(local)
        shards.extend(braceexpand(part))
    missing = [s for s in shards if not _is_remote(s) and not Path(s).is_file()]
    if missing:
        raise ConfigError(key, missing[0], "existing shard files or reachable URLs",
                          f"{len(missing)} of {len(shards)} shards not found")
    return shards


def open_url(url: str) -> IO[bytes]:
    """A readable binary stream: a local file, ``pipe:COMMAND`` (its stdout), or any urllib URL."""
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 - the user's command
        assert process.stdout is not None
        return process.stdout
    if _is_remote(url):
        return urllib.request.urlopen(url)  # noqa: S310 - the user's URL
    return open(url, "rb")


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def iter_tar(stream: IO[bytes]) -> Iterator[tuple[str, Raw]]:
    """``(key, {extension: bytes})`` per sample, in file order (members of a sample are consecutive)."""
    key, raw = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            name_key, ext = _split_name(member.name)
            if not ext or os.path.basename(member.name).startswith("."):
                continue
            if name_key != key:
                if key is not None and raw:
                    yield key, raw
                key, raw = name_key, {}
            handle = archive.extractfile(member)
            raw[ext] = handle.read() if handle is not None else b""
    if key is not None and raw:
        yield key, raw


def iter_shard(url: str) -> Iterator[tuple[str, Raw]]:
    """The samples of one shard; a ``pipe:`` command is waited for (and killed if left early)."""
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 - the user's command
        assert process.stdout is not None
        try:
            yield from iter_tar(process.stdout)
        finally:
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            process.wait()
        return
    stream = open_url(url)
    try:
        yield from iter_tar(stream)
    finally:
        stream.close()


def _manifest_url(shard: str) -> str:
    if shard.startswith("pipe:"):
        return ""
    return shard.rsplit("/", 1)[0] + "/" + MANIFEST if "/" in shard else MANIFEST


def read_manifest(shard: str, url: str | None = None) -> dict | None:
    """``url`` (or ``shards.json`` beside ``shard``), local or fetched, or None."""
    url = url or _manifest_url(shard)
    if not url:
        return None
    try:
        if _is_remote(url):
            with urllib.request.urlopen(url) as response:  # noqa: S310
                return json.loads(response.read().decode())
        if Path(url).is_file():
            return json.loads(Path(url).read_text())
    except (OSError, ValueError):
        return None
    return None


def count_samples(shard: str) -> int:
    """Samples in a local shard, from its tar headers (data is skipped, not read)."""
    keys = set()
    with tarfile.open(shard, mode="r:*") as archive:
        for member in archive.getmembers():
            name_key, ext = _split_name(member.name)
            if member.isfile() and ext and not os.path.basename(member.name).startswith("."):
                keys.add(name_key)
    return len(keys)


def shard_name(shard: str) -> str:
    """The shard's file name (for ``pipe:`` URLs, the last ``*.tar`` named in the command)."""
    if shard.startswith("pipe:"):
        names = re.findall(r"([^\s/]+\.tar)\b", shard)
        return names[-1] if names else shard
    return shard.rsplit("/", 1)[-1]


def shard_sizes(shards: Sequence[str], key: str = "data.urls", manifest: str | None = None) -> tuple[list[int], list[str]]:
    """Samples per shard and the class names, from ``manifest`` or the ``shards.json`` beside each shard
    (matched by file name), else, for local shards, from the tar headers."""
    if manifest is not None and read_manifest("", str(manifest)) is None:
        raise ConfigError("data.manifest", manifest, f"a readable {MANIFEST} (path or URL) as scripts/make_shards.py writes")
    manifests: dict[str, dict | None] = {}
    sizes, classes = [], []
    for shard in shards:
        url = str(manifest) if manifest is not None else _manifest_url(shard)
        if url not in manifests:
            manifests[url] = read_manifest(shard, url)
        found = manifests[url]
        name = shard_name(shard)
        counts = {entry["name"]: int(entry["count"]) for entry in (found or {}).get("shards", [])}
        if found and not classes:
            classes = list(found.get("classes", []))
        if name in counts:
            sizes.append(counts[name])
        elif not _is_remote(shard):
            sizes.append(count_samples(shard))
        else:
            raise ConfigError(key, shard, f"remote shards with a {MANIFEST} beside them or named by data.manifest "
                                          "(scripts/make_shards.py writes one)", f"no sample count for {name}")
    return sizes, classes


# ------------------------------------------------------------------------------------------------ decoding


def decode_rgb(data: bytes) -> Image.Image:
    """Image bytes as 8-bit RGB, converted as :func:`~mim_lightning.data.datasets.load_rgb` converts files."""
    with Image.open(io.BytesIO(data)) as image:
        return as_rgb(image)


def decode_sample(raw: Raw) -> tuple[Image.Image, int]:
    """The sample's image and label (-1 when it has none); raises ValueError/OSError when unreadable."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        ext = next((e for e in raw if e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if ext is None:
        raise ValueError(f"no image member (have {sorted(raw)})")
    label_ext = next((e for e in LABEL_EXTS if e in raw), None)
    label = int(raw[label_ext].decode().strip()) if label_ext else -1
    return decode_rgb(raw[ext]), label


# ------------------------------------------------------------------------------------------------- dataset


def round_robin_order(counts: Sequence[int], total: int) -> list[int]:
    """The worker of each of the first ``total`` batches of a DataLoader that takes batches from its
    workers round-robin, dropping a worker once it is exhausted (what ``torch.utils.data.DataLoader``
    does for iterable datasets)."""
    left = list(counts)
    order: list[int] = []
    while len(order) < total and any(left):
        for worker, count in enumerate(left):
            if count > 0 and len(order) < total:
                order.append(worker)
                left[worker] -= 1
    return order


class ShardDataset(IterableDataset):
    """Samples streamed from tar shards, split by rank and worker, through a :class:`MIMTransform`.

    Iterating yields items ``{"images": (3, H, W) float, "mask": (gh, gw) bool (with a mask generator),
    "label": int (when shards carry ``.cls``), "index": int}`` where ``index`` is the sample's global
    position (shard offset + position in shard, plus ``pass x total`` with ``repeat``), so crops and masks
    are seeded exactly as :class:`~mim_lightning.data.datasets.ImageDataset` seeds them.
    ``dataset[(index, epoch)]`` reads one sample directly (for previews; it streams its shard).
    Set :attr:`epoch`, :attr:`rank`, :attr:`world_size` and :attr:`skip_batches` before iterating.
    """

    def __init__(self, shards: Sequence[str], sizes: Sequence[int], transform: MIMTransform, batch_size: int,
                 seed: int = 0, repeat: int = 1, shuffle_buffer: int = 1000, shuffle: bool = True) -> None:
        if not shards:
            raise ValueError("ShardDataset needs at least one shard")
        self.shards = list(shards)
        self.sizes = [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.transform = transform
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.repeat = max(1, int(repeat))
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.rank = 0
        self.world_size = 1
        self.skip_batches = 0
        self._plans: dict[int, list[tuple[int, int]]] = {}
        # One flag per sample (its global position), shared with the loader workers: each unreadable sample
        # is counted and warned about once, whichever worker, pass or epoch meets it.
        self.bad = torch.zeros(self.total, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return self.total * self.repeat

    def num_bad(self) -> int:
        """Distinct unreadable samples found so far, by any loader worker."""
        return int(self.bad.sum())

    def first_readable(self, limit: int = 64) -> bool | None:
        """Read the first shard's first samples until one decodes (a bounded setup probe): True when one
        did, False when all of the first ``limit`` failed, None when the shard could not be opened."""
        failed: list[tuple[int, str, Exception]] = []
        try:
            for position, (key, raw) in enumerate(iter_shard(self.shards[0])):
                if position >= min(int(limit), self.sizes[0]):
                    break
                try:
                    decode_sample(raw)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                    failed.append((position, key, exc))
                    continue
                for bad in failed:  # real skips: reported (a source none of which reads is one error instead)
                    self._note_bad(*bad)
                return True
        except (OSError, ValueError, tarfile.TarError):
            return None
        return False

    # -- the epoch plan ------------------------------------------------------------------------------
    def epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        """``(pass, shard)`` pairs of an epoch, in reading order before the rank/worker deal."""
        if int(epoch) in self._plans:
            return self._plans[int(epoch)]
        items = []
        for p in range(self.repeat):
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), p, 0x5A4D])).permutation(order)
            items.extend((p, int(s)) for s in order)
        self._plans = {int(epoch): items}
        return items

    def worker_items(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[tuple[int, int]]:
        return self.epoch_items(epoch)[rank::world_size][worker::max(1, num_workers)]

    def worker_batches(self, epoch: int, rank: int, world_size: int, num_workers: int) -> list[int]:
        """Full batches each worker of ``rank`` yields in ``epoch``."""
        workers = max(1, num_workers)
        return [sum(self.sizes[s] for _, s in self.worker_items(epoch, rank, world_size, w, workers)) // self.batch_size
                for w in range(workers)]

    def batches_per_rank(self, epoch: int, world_size: int, num_workers: int) -> int:
        """The batches every rank yields in ``epoch``: the smallest count over the ranks."""
        return min(sum(self.worker_batches(epoch, r, world_size, num_workers)) for r in range(world_size))

    # -- reading ---------------------------------------------------------------------------------------
    def _raw_stream(self, items: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Raw]]:
        for p, shard in items:
            base = p * self.total + int(self.offsets[shard])
            count = 0
            for position, (key, raw) in enumerate(iter_shard(self.shards[shard])):
                if position >= self.sizes[shard]:
                    break
                count += 1
                yield base + position, key, raw
            if count < self.sizes[shard]:
                raise RuntimeError(f"shard {self.shards[shard]} has {count} samples, its manifest says {self.sizes[shard]}")

    def _shuffled(self, stream: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from stream
            return
        buffer: list[Any] = []
        for item in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            pick = int(rng.integers(len(buffer)))
            buffer[pick], item = item, buffer[pick]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _item(self, index: int, epoch: int, image: Image.Image, label: int) -> dict:
        return transformed_item(self.transform, self.seed, epoch, index, image, label)

    def _note_bad(self, index: int, key: str, exc: Exception) -> None:
        position = int(index) % self.total
        if self.bad[position]:
            return
        self.bad[position] = True
        warnings.warn(f"skipping unreadable sample {key}: {type(exc).__name__}: {exc} (replaced by a readable one)",
                      stacklevel=2)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, rank, world = self.epoch, self.rank, self.world_size
        counts = self.worker_batches(epoch, rank, world, workers)
        order = round_robin_order(counts, self.batches_per_rank(epoch, world, workers))
        skip_batches = min(self.skip_batches, len(order))
        # A resumed loader asks its workers from worker 0 again: worker 0 plays the logical worker that
        # served the first batch not yet trained on, so the batch order continues as if never stopped.
        rotation = order[skip_batches] if skip_batches < len(order) else 0
        logical = (worker + rotation) % workers
        items = self.worker_items(epoch, rank, world, logical, workers)
        # This worker's share of the rank's (capped) batches, and of those already trained on.
        mine = order.count(logical) * self.batch_size
        skip = order[:skip_batches].count(logical) * self.batch_size
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), rank, logical, 0xB0F]))
        stream = self._shuffled(self._raw_stream(items), rng)
        pending: list[int] = []  # indices whose sample was unreadable, waiting for a readable image
        for position, (index, key, raw) in enumerate(itertools.islice(stream, mine)):
            if position < skip:
                continue
            try:
                image, label = decode_sample(raw)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                self._note_bad(index, key, exc)
                pending.append(index)
                continue
            for bad_index in pending:  # the same number of samples as planned, whatever was unreadable
                yield self._item(bad_index, epoch, image, label)
            pending.clear()
            yield self._item(index, epoch, image, label)
        if pending:
            raise RuntimeError(f"no readable sample after {len(pending)} unreadable ones at the end of a worker's shards")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        position = int(index) % self.total
        shard = int(np.searchsorted(self.offsets, position, side="right") - 1)
        local = position - int(self.offsets[shard])
        for i, (name, raw) in enumerate(iter_shard(self.shards[shard])):
            if i == local:
                image, label = decode_sample(raw)
                return self._item(int(index), int(epoch), image, label)
        raise IndexError(f"sample {index} not found in {self.shards[shard]}")


class RawSampleDataset(ImageDataset):
    """A few samples held in memory as raw bytes (validation shards): map-style, keys ``(index, epoch)``.

    An unreadable sample is replaced by the next readable one, marked ``"valid": False`` and counted, as
    :class:`~mim_lightning.data.datasets.ImageDataset` does for held-out files."""

    def __init__(self, samples: Sequence[Raw], transform: MIMTransform, seed: int = 0) -> None:
        super().__init__(samples, transform, seed=seed, replace_within=None, mark_replaced=True, key="data.val_urls")

    def read(self, position: int) -> tuple[Image.Image, int]:
        return decode_sample(self.samples[position])

    def describe_sample(self, position: int) -> str:
        return f"validation sample {position}"


class ShardLoader(DataLoader):
    """The training loader over a :class:`ShardDataset`: every rank yields exactly :meth:`__len__`
    batches per epoch, the epoch comes from the trainer, and the position (epoch, batches done) is
    saved and restored like :class:`~mim_lightning.data.sampler.ResumableDataLoader`'s."""

    def __init__(self, dataset: ShardDataset, *args: Any, epoch_fn: Callable[[], int], progress: Callable[[], int],
                 rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn
        self.progress = progress
        self.rank, self.world_size = rank, world_size
        self._resume: tuple[int, int] | None = None
        self._epoch: int | None = None

    def _num_batches(self, epoch: int) -> int:
        return self.dataset.batches_per_rank(epoch, self.world_size, self.num_workers)

    def __len__(self) -> int:
        return self._num_batches(self.epoch_fn())

    def __iter__(self):
        dataset: ShardDataset = self.dataset
        # A restored position wins over the trainer's epoch counter: Lightning creates the first
        # iterator of a resumed fit before its loops report the restored epoch.
        epoch, skip = self._resume if self._resume is not None else (int(self.epoch_fn()), 0)
        self._resume = None
        self._epoch = epoch
        dataset.epoch, dataset.rank, dataset.world_size, dataset.skip_batches = epoch, self.rank, self.world_size, skip
        total = self._num_batches(epoch)
        return itertools.islice(super().__iter__(), max(0, total - skip))

    def state_dict(self) -> dict[str, int]:
        epoch = self._epoch if self._epoch is not None else int(self.epoch_fn())
        return {"epoch": epoch, "batches_done": int(self.progress()), "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        self._resume = (epoch + 1, 0) if done >= self._num_batches(epoch) else (epoch, done)


# -------------------------------------------------------------------------------------------- writing


def write_shards(samples: Sequence[tuple[str, int]], output: str | os.PathLike, prefix: str = "shard",
                 maxcount: int = 10000, classes: Sequence[str] = ()) -> list[Path]:
    """Write ``(image path, label)`` pairs (label -1: none) as tar shards of ``maxcount`` samples into
    ``output``, named ``<prefix>-000000.tar`` ..., plus ``shards.json`` (samples per shard, classes).
    Image bytes are stored as they are (no re-encoding); keys are the running sample number.
    Shards are written under a temporary name and renamed, so a crash leaves no partial shard."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    maxcount = max(1, int(maxcount))
    written, entries = [], []
    for number, start in enumerate(range(0, len(samples), maxcount)):
        chunk = samples[start: start + maxcount]
        target = out / f"{prefix}-{number:06d}.tar"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with tarfile.open(tmp, "w") as archive:
            for offset, (path, label) in enumerate(chunk):
                key = f"{start + offset:09d}"
                ext = Path(path).suffix.lower().lstrip(".") or "jpg"
                ext = "jpg" if ext == "jpeg" else ext
                members = [(f"{key}.{ext}", Path(path).read_bytes())]
                if label >= 0:
                    members.append((f"{key}.cls", str(int(label)).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o444
                    archive.addfile(info, io.BytesIO(data))
        os.replace(tmp, target)
        written.append(target)
        entries.append({"name": target.name, "count": len(chunk)})
    manifest = {"shards": entries, "classes": list(classes), "total": len(samples)}
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return written


def demo_shards(cache_dir: str | None = None, maxcount: int = 4) -> Path:
    """The demo photos (see :mod:`mim_lightning.data.demo`) as small shards in ``cache_dir`` (default
    ``$MIM_LIGHTNING_CACHE/demo_shards``); idempotent."""
    from mim_lightning.data.demo import default_cache_dir, write_demo_photos

    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "demo_shards"
    if not (folder / MANIFEST).is_file():
        paths = sorted(str(p) for p in write_demo_photos(default_cache_dir()))
        write_shards([(p, -1) for p in paths], folder, prefix="demo", maxcount=maxcount)
    return folder


# ---------------------------------------------------------------------------------------- datamodule


class ShardDataModule(TrainPositionState, pl.LightningDataModule):
    """Pretraining images from tar shards (``data=webdataset``), with the same transforms, masks and
    batch dicts as :class:`~mim_lightning.data.PretrainDataModule`.

    Args:
        urls: the training shards (folder, brace pattern, URLs, ``::``-separated or a list); None: the
            demo photos written as shards into the cache (a smoke test, like ``data=demo``).
        val_urls: optional validation shards; their first ``val_max_images`` samples are held in memory
            and validated like folder data (centre crops, fixed masks), split over the ranks.
        shuffle_buffer: samples in each worker's shuffle buffer (raw bytes; ~100 kB per ImageNet JPEG).
        repeat: passes over the shards per epoch (each with its own shard order, crops and masks).
        manifest: the ``shards.json`` (path or URL) giving the samples per shard, when it is not beside
            the shards (e.g. for ``pipe:`` URLs); matched to the shards by file name.
        image_size, batch_size, num_workers, pin_memory, prefetch_factor, crop_scale, crop_ratio, hflip,
            color_jitter, interpolation, mean, std, seed, mask_generator: as for ``PretrainDataModule``.
    """

    def __init__(self, urls: str | Sequence[str] | None = None, val_urls: str | Sequence[str] | None = None,
                 image_size: int = 224, batch_size: int = 64, num_workers: int = 8, pin_memory: bool = True,
                 prefetch_factor: int | None = 2, shuffle_buffer: int = 1000, repeat: int = 1, val_max_images: int = 1000,
                 crop_scale: Sequence[float] = (0.2, 1.0), crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 seed: int = 0, mask_generator: MaskGenerator | None = None, color_jitter: float = 0.0,
                 cache_dir: str | None = None, manifest: str | None = None) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ConfigError("data.batch_size", batch_size, "a positive integer")
        if int(num_workers) < 0:
            raise ConfigError("data.num_workers", num_workers, "0 or more")
        self.manifest = manifest
        if int(shuffle_buffer) < 1:
            raise ConfigError("data.shuffle_buffer", shuffle_buffer, "a positive integer (1 = no shuffling within shards)")
        self.urls = urls if urls is None or isinstance(urls, str) else list(urls)
        self.val_urls = val_urls if val_urls is None or isinstance(val_urls, str) else list(val_urls)
        self.image_size = image_size
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.shuffle_buffer = int(shuffle_buffer)
        self.repeat = int(repeat)
        self.val_max_images = int(val_max_images)
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = int(seed)
        self.mask_generator = mask_generator
        self.cache_dir = cache_dir
        self.train_transform = MIMTransform(
            pretrain_image_transform(image_size, crop_scale, crop_ratio, hflip, interpolation, self.mean, self.std,
                                     color_jitter), mask_generator)
        self.val_transform = MIMTransform(eval_image_transform(image_size, interpolation, self.mean, self.std), mask_generator)
        self.train_dataset: ShardDataset | None = None
        self.val_dataset: RawSampleDataset | None = None
        self.classes: list[str] = []
        self._train_loader: ShardLoader | None = None
        self._resume_state: dict | None = None
        self._epoch = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        urls = self.urls if self.urls is not None else str(demo_shards(self.cache_dir))
        shards = expand_urls(urls, "data.urls")
        sizes, self.classes = shard_sizes(shards, "data.urls", self.manifest)
        self.train_dataset = ShardDataset(shards, sizes, self.train_transform, self.batch_size, seed=self.seed,
                                          repeat=self.repeat, shuffle_buffer=self.shuffle_buffer)
        if self.val_urls is not None:
            raw = []
            for shard in expand_urls(self.val_urls, "data.val_urls"):
                for _key, sample in iter_shard(shard):
                    if len(raw) >= self.val_max_images:
                        break
                    raw.append(sample)
            self.val_dataset = RawSampleDataset(raw, self.val_transform, seed=self.seed + 1) if raw else None
            if self.val_dataset is not None:
                self.val_dataset.value = self.val_urls
                if self.val_dataset.first_readable(None) is None:
                    runlog.warning(f"no readable validation sample (all {len(raw)} failed to decode): validation is off")
                    self.val_dataset = None
        if self.train_dataset.first_readable() is False:
            tried = min(64, self.train_dataset.sizes[0])
            raise no_readable_images("data.urls", shards[0], tried, self.train_dataset.sizes[0])
        self._check(*self._rank_and_world())

    def describe(self) -> dict[str, Any]:
        """What the run reads, after ``setup("fit")`` (the keys of :meth:`PretrainDataModule.describe`)."""
        demo = self.urls is None
        if demo:
            source = "demo photos as shards (17 images from scikit-image)"
        else:
            shards = self.train_dataset.shards if self.train_dataset is not None else []
            text = self.urls if isinstance(self.urls, str) else "::".join(map(str, self.urls))
            source = f"shards {text}" + (f" ({len(shards)} shards)" if len(shards) > 1 else "")
        train = self.train_dataset.total if self.train_dataset is not None else None
        val = len(self.val_dataset) if self.val_dataset is not None else 0
        skipped = sum(int(ds.bad.sum()) for ds in (self.train_dataset, self.val_dataset) if ds is not None)
        return {"source": source, "demo": demo, "images": train, "train": train, "val": val,
                "classes": len(self.classes), "skipped": skipped, "repeat": self.repeat}

    def _check(self, rank: int, world: int) -> None:
        assert self.train_dataset is not None
        count = len(self.train_dataset.shards) * self.train_dataset.repeat
        if count < world:
            raise ConfigError("data.urls", f"{len(self.train_dataset.shards)} shards",
                              f"at least one shard per device ({world}; or raise data.repeat)")
        if self.train_dataset.batches_per_rank(0, world, self.num_workers) < 1:
            raise ConfigError("data.batch_size", self.batch_size,
                              "at most the samples of one device's shards per worker (lower data.batch_size or "
                              "data.num_workers, or raise data.repeat)", "an epoch would have no batch")

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def _current_epoch(self) -> int:
        return self._epoch if self.trainer is None else int(self.trainer.current_epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch to read when there is no trainer (scripts, tests)."""
        self._epoch = int(epoch)

    def _batches_done(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def num_skipped(self) -> int:
        """Distinct unreadable samples found so far (replaced, not fatal), over every loader worker and, when a
        process group runs, every rank (then a collective: call it on all ranks, as an epoch-end hook does)."""
        return union_count([ds.bad for ds in (self.train_dataset, self.val_dataset) if ds is not None], self.trainer)

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            extra["prefetch_factor"] = int(self.prefetch_factor)
        extra["collate_fn"] = collate_batch_mask if getattr(self.mask_generator, "per_batch", False) else default_collate
        return extra

    def train_dataloader(self) -> ShardLoader:
        self.setup("fit")
        rank, world = self._rank_and_world()
        self._check(rank, world)
        loader = ShardLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                             pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=True,
                             epoch_fn=self._current_epoch, progress=self._batches_done, rank=rank, world_size=world,
                             **self._extra())
        return self._track_train_loader(loader)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        rank, world = self._rank_and_world()
        sampler = EpochIndexSampler(len(self.val_dataset), shuffle=False, seed=self.seed, rank=rank, world_size=world)
        return DataLoader(self.val_dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory and torch.cuda.is_available(), **self._extra())

