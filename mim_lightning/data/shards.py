"""Tar shards in the WebDataset layout as an indexed source (``data=webdataset``), through ``wids``.

A shard is a plain tar file; the members of one sample share a key (the path up to the first dot of the
file name) and differ by extension: ``000123.jpg`` (or png, webp, ...), optionally ``000123.cls`` (an
integer label). Shards written by ``scripts/make_shards.py`` (``webdataset.ShardWriter``), by img2dataset
or by plain ``tar`` read the same way.

The shards are read with ``wids`` (the indexed half of the WebDataset project): each shard is
memory-mapped and indexed once, so sample ``i`` is a random access like a file in a folder. That makes
shards one more indexed source: the train/val split, rank split, per-sample seeding, equal batches per
rank, exact mid-epoch resume and unreadable-sample skipping are the folder path's, unchanged. Remote shards
(``http(s)://``, ``s3://``, ``gs://``, ``pipe:``) are downloaded whole by wids into ``cache_dir`` the first
time a sample of theirs is read. Why wids rather than ``webdataset``'s streaming reader: see
``docs/architecture.md`` (Data).

Locations (``data.source.urls``): a wids shard index (``shardindex.json``, path or URL), a folder (its
``shardindex.json``, else all ``*.tar`` in it), a brace pattern (``shard-{000000..000099}.tar``), several
joined by ``::``, or a list. Samples per shard come from the index; local shards without one are counted
by wids. The index written by ``make_shards`` also carries the class names and each shard's labels
(extra keys that wids ignores), so a labelled split needs no pass over the data.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mim_lightning.data.sources import Sample, Source
from mim_lightning.errors import ConfigError

INDEX = "shardindex.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")
LABEL_EXTS = (".cls", ".label")
KEY = "data.source.urls"


def _is_remote(url: str) -> bool:
    """``pipe:``, ``http(s)://``, ``s3://``, ... (anything with a scheme but ``file://``)."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def _local(url: str) -> str:
    path = url[len("file://"):] if url.startswith("file://") else url
    return str(Path(os.path.expandvars(path)).expanduser())


def read_index(url: str) -> dict:
    """A wids shard index (local or remote), shard URLs resolved against its folder."""
    from wids.wids_specs import load_dsdesc_and_resolve, urldir

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return load_dsdesc_and_resolve(url if _is_remote(url) else _local(url), base=urldir(url))
    except Exception as exc:  # noqa: BLE001 - wids raises assertions and I/O errors alike
        raise ConfigError(KEY, url, f"a readable wids shard index ({INDEX}, as scripts/make_shards.py writes)",
                          f"{type(exc).__name__}: {exc}") from None


def resolve_shards(urls: str | Sequence[str] | None) -> tuple[list[dict], list[str]]:
    """``([{"url", "nsamples", "labels"?}, ...], classes)`` for ``data.source.urls`` (see the module docstring)."""
    from braceexpand import braceexpand
    from wids.wids import compute_num_samples

    if urls is None or (isinstance(urls, str) and urls.strip() in ("", "???")):
        raise ConfigError(KEY, urls, "tar shards: a folder, a shardindex.json, a brace pattern like "
                                     "/data/shard-{000000..000099}.tar, URLs, or a list of them")
    parts = urls.split("::") if isinstance(urls, str) else [str(u) for u in urls]
    shards: list[dict] = []
    classes: list[str] = []
    for part in (p.strip() for p in parts if p.strip()):
        local = Path(_local(part))
        if not _is_remote(part) and local.is_dir():
            if (local / INDEX).is_file():
                part = str(local / INDEX)
            else:
                found = sorted(str(p) for p in local.glob("*.tar"))
                if not found:
                    raise ConfigError(KEY, part, "a folder containing .tar shards or a shardindex.json", "no .tar files in it")
                shards.extend({"url": p} for p in found)
                continue
        if part.endswith(".json"):
            index = read_index(part)
            shards.extend(dict(entry) for entry in index["shardlist"])
            classes = classes or list(index.get("classes", []))
            continue
        shards.extend({"url": u if _is_remote(u) else _local(u)} for u in braceexpand(part))
    for entry in shards:
        if "nsamples" in entry:
            continue
        if _is_remote(entry["url"]):
            raise ConfigError(KEY, entry["url"], f"remote shards listed in a wids {INDEX} (it gives their sizes)",
                              "no sample count for it")
        if not Path(entry["url"]).is_file():
            raise ConfigError(KEY, entry["url"], "existing shard files or reachable URLs", "shard not found")
        entry["nsamples"] = compute_num_samples(entry["url"])
    return shards, classes


def image_member(raw: dict) -> bytes:
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        ext = next((e for e in raw if not e.startswith("__") and "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if ext is None:
        raise ValueError(f"no image member (have {sorted(k for k in raw if not k.startswith('__'))})")
    return raw[ext]


def label_member(raw: dict) -> int:
    ext = next((e for e in LABEL_EXTS if e in raw), None)
    return int(raw[ext].decode().strip()) if ext else -1


class ShardSource(Source):
    """Samples of WebDataset tar shards, random access through ``wids`` (see the module docstring).

    Args:
        urls: the shards (index, folder, brace pattern, URLs, ``::``-joined or a list). None: the demo photos
            written as shards into the cache (a smoke test, like ``data=demo``).
        cache_dir: where remote shards are downloaded (default ``$MIM_LIGHTNING_CACHE/shards``), and the demo
            shards written.
        lru_size: shards each process keeps open (memory-mapped) at once.
    """

    key = KEY

    def __init__(self, urls: str | Sequence[str] | None = None, cache_dir: str | None = None, lru_size: int = 64) -> None:
        self.urls = urls if urls is None or isinstance(urls, str) else list(urls)
        self.cache_dir = cache_dir
        self.lru_size = int(lru_size)
        self.demo = urls is None
        self._shards: list[dict] | None = None
        self._classes: list[str] = []
        self._labels: list[int] | None = None
        self._readers: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:  # open shards stay in their process
        return {**self.__dict__, "_readers": None, "_pid": None}

    def shards(self) -> list[dict]:
        if self._shards is None:
            urls = self.urls if self.urls is not None else str(demo_shards(self.cache_dir) / INDEX)
            self._shards, self._classes = resolve_shards(urls)
            self._offsets = np.concatenate([[0], np.cumsum([int(s["nsamples"]) for s in self._shards])]).astype(np.int64)
        return self._shards

    # -- reading through wids --------------------------------------------------------------------------
    def _reader(self, url: str) -> Any:
        from wids.wids import IndexedTarSamples
        from wids.wids_dl import download_and_open
        from wids.wids_lru import LRUCache

        if self._readers is None or self._pid != os.getpid():
            self._readers, self._pid = LRUCache(self.lru_size, release_handler=lambda _k, v: v.close()), os.getpid()
        if url not in self._readers:
            if _is_remote(url):
                from wids.wids import DefaultLocalname

                cache = self.cache_dir or os.path.join(_cache_base(), "shards")
                local = DefaultLocalname(cache)(url)
                with download_and_open(url, local) as stream:
                    self._readers[url] = IndexedTarSamples(path=local, stream=stream)
            else:
                self._readers[url] = IndexedTarSamples(path=url)
        return self._readers[url]

    def locate(self, position: int) -> tuple[dict, int]:
        shards = self.shards()
        shard = int(np.searchsorted(self._offsets, position, side="right") - 1)
        return shards[shard], int(position - self._offsets[shard])

    def raw(self, position: int) -> dict:
        """Sample ``position``'s members ``{".jpg": bytes, ".cls": bytes, "__key__": ...}``."""
        entry, local = self.locate(position)
        sample = self._reader(entry["url"])[local]
        return {k: (v.getvalue() if isinstance(v, io.BytesIO) else v) for k, v in sample.items()}

    # -- the Source interface ----------------------------------------------------------------------------
    def _read_labels(self) -> list[int]:
        if self._labels is None:
            shards = self.shards()
            if all("labels" in s for s in shards):
                self._labels = [int(v) for s in shards for v in s["labels"]]
            elif any(e in self.raw(0) for e in LABEL_EXTS):  # no labels in the index: one pass over the .cls members
                self._labels = [label_member(self.raw(i)) for i in range(int(self._offsets[-1]))]
            else:
                self._labels = [-1] * int(self._offsets[-1])
        return self._labels

    @property
    def labelled(self) -> bool:  # type: ignore[override]
        labels = self._read_labels()
        return bool(labels) and labels[0] >= 0

    @property
    def classes(self) -> list[str]:
        labels = self._read_labels()
        if self._classes or not labels or labels[0] < 0:
            return self._classes
        return [str(i) for i in range(max(labels) + 1)]

    def samples(self) -> list[Sample]:
        labels = self._read_labels()
        if not labels:
            raise ConfigError(KEY, self.urls, "shards with at least one sample", "they are empty")
        return [Sample(str(i), label) for i, label in enumerate(labels)]

    def open(self, sample: Sample) -> Image.Image:
        return Image.open(io.BytesIO(image_member(self.raw(int(sample.path)))))

    def describe(self) -> str:
        if self.demo:
            return "demo photos as shards (17 images from scikit-image)"
        text = self.urls if isinstance(self.urls, str) else "::".join(map(str, self.urls))
        count = len(self._shards or [])
        return f"shards {text}" + (f" ({count} shards)" if count > 1 else "")

    def describe_sample(self, sample: Sample) -> str:
        entry, local = self.locate(int(sample.path))
        return f"sample {local} of {entry['url']}"


# -------------------------------------------------------------------------------------------- writing


def write_shards(samples: Sequence[tuple[str, int]], output: str | os.PathLike, prefix: str = "shard",
                 maxcount: int = 10000, classes: Sequence[str] = ()) -> list[Path]:
    """Write ``(image path, label)`` pairs (label -1: none) with ``webdataset.ShardWriter`` as
    ``<output>/<prefix>-000000.tar`` ... (``maxcount`` samples each; image bytes stored as they are; keys the
    running sample number), then the wids shard index ``shardindex.json`` (written last, atomically) with
    the class names and each shard's labels."""
    import webdataset as wds

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max(1, int(maxcount)), verbose=0) as sink:
        for number, (path, label) in enumerate(samples):
            ext = Path(path).suffix.lower().lstrip(".") or "jpg"
            sample = {"__key__": f"{number:09d}", "jpg" if ext == "jpeg" else ext: Path(path).read_bytes()}
            if label >= 0:
                sample["cls"] = str(int(label)).encode()
            sink.write(sample)
    written = sorted(out.glob(f"{prefix}-*.tar"))
    step = max(1, int(maxcount))
    entries = []
    for number, shard in enumerate(written):
        chunk = samples[number * step: (number + 1) * step]
        entry = {"url": shard.name, "nsamples": len(chunk), "filesize": shard.stat().st_size}
        if any(label >= 0 for _p, label in chunk):
            entry["labels"] = [int(label) for _p, label in chunk]
        entries.append(entry)
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": prefix, "shardlist": entries,
             "classes": list(classes)}
    tmp = out / f".{INDEX}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)
    return written


def _cache_base() -> str:
    from mim_lightning.data.demo import default_cache_dir

    return str(default_cache_dir().parent)


def demo_shards(cache_dir: str | None = None, maxcount: int = 4) -> Path:
    """The demo photos as small shards in ``cache_dir`` (default ``$MIM_LIGHTNING_CACHE/demo_shards``); idempotent."""
    from mim_lightning.data.demo import default_cache_dir, write_demo_photos

    folder = Path(cache_dir).expanduser() if cache_dir else Path(_cache_base()) / "demo_shards"
    if not (folder / INDEX).is_file():
        paths = sorted(str(p) for p in write_demo_photos(default_cache_dir()))
        write_shards([(p, -1) for p in paths], folder, prefix="demo", maxcount=maxcount)
    return folder
