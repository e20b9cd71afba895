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
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mim_lightning.data.sources import Sample, Source, file_kind
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


def resolve_shards(urls: str | Sequence[str] | None, verify: bool = True) -> tuple[list[dict], list[str]]:
    """``([{"url", "nsamples", "labels"?}, ...], classes)`` for ``data.source.urls`` (see the module docstring).

    Every local shard is checked (:func:`check_shard`): a missing, truncated or garbage shard, or one whose
    sample count is not its index's, is a one-line error naming it. ``verify=False`` keeps only the cheap
    checks (the file exists and has the index's size) for shards that have an index entry."""
    from braceexpand import braceexpand

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
            shards.extend({**entry, "index": part} for entry in index["shardlist"])
            classes = classes or list(index.get("classes", []))
            continue
        shards.extend({"url": u if _is_remote(u) else _local(u)} for u in braceexpand(part))
    for entry in shards:
        if "nsamples" in entry:
            count = entry["nsamples"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ConfigError(KEY, entry["url"], f"an index whose nsamples are whole numbers, as scripts/make_shards.py "
                                                     f"writes", f"nsamples={count!r}{_listed(entry)}")
        if _is_remote(entry["url"]):
            if "nsamples" not in entry:
                raise ConfigError(KEY, entry["url"], f"remote shards listed in a wids {INDEX} (it gives their sizes)",
                                  "no sample count for it")
            continue  # checked when downloaded (see ShardSource._reader)
        entry["url"] = _local(entry["url"])
        check_shard(entry, walk=verify or "nsamples" not in entry)
    return shards, classes


def _listed(entry: dict) -> str:
    return f" (listed in {entry['index']})" if entry.get("index") else ""


def check_shard(entry: dict, walk: bool = True) -> None:
    """Check a local shard against its index entry; one-line :class:`ConfigError` s naming the shard: missing,
    not a regular file, not the index's ``filesize`` or not a whole number of 512-byte tar blocks (truncated or
    rewritten); with ``walk``, reading its tar headers (about 2 s per 100k samples on a slow CPU; the loader
    workers index every shard they open anyway): not a tar (garbage), a last member cut short, no samples, or
    a sample count other than the index's ``nsamples`` (stored in the entry when the index gave none)."""
    from wids.wids import IndexedTarSamples

    url = entry["url"]
    rebuild = "re-run scripts/make_shards.py, or fix or remove the shard" + ("" if not entry.get("index") else
                                                                             f" and its entry in {INDEX}")
    try:
        info = os.stat(url)
    except OSError as exc:
        raise ConfigError(KEY, url, "existing shard files or reachable URLs",
                          f"shard not found{_listed(entry)}: {type(exc).__name__}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(KEY, url, "tar shards that are regular files", f"{file_kind(info.st_mode)}{_listed(entry)}")
    size = info.st_size
    if "filesize" in entry and int(entry["filesize"]) != size:
        raise ConfigError(KEY, url, rebuild, f"shard is {size} bytes, its index says {int(entry['filesize'])}"
                                             f"{_listed(entry)}: truncated or rewritten")
    if size % 512:
        raise ConfigError(KEY, url, rebuild, f"shard is {size} bytes, not a whole number of 512-byte tar blocks: truncated")
    if not walk:
        return
    try:
        with open(url, "rb") as stream, contextlib.redirect_stdout(io.StringIO()):  # wids prints bad headers
            reader = IndexedTarSamples(path=url, stream=stream)
            count = len(reader)
            end = max((offset + 512 + length for _name, offset, length in reader.reader.by_index), default=0)
            reader.close()
    except Exception as exc:  # noqa: BLE001 - wids raises struct, Unicode, value and assertion errors alike
        raise ConfigError(KEY, url, rebuild, f"not a readable tar shard{_listed(entry)}: {type(exc).__name__}: {exc}") from None
    if end > size:
        raise ConfigError(KEY, url, rebuild, f"truncated: its last member ends at byte {end}, the file has {size}")
    if "nsamples" in entry and int(entry["nsamples"]) != count:
        raise ConfigError(KEY, url, rebuild, f"shard has {count} samples, its index says {int(entry['nsamples'])}"
                                             f"{_listed(entry)}")
    if count == 0:
        raise ConfigError(KEY, url, rebuild, "shard has no samples (not a tar of <key>.<ext> members?)")
    entry["nsamples"] = count


class ShardReadError(OSError):
    """A shard (or a sample of it) that cannot be read while training: its samples are skipped and counted
    like unreadable images (shards that changed after setup, remote shards once downloaded)."""


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
        verify: read every local shard's tar headers at setup (:func:`check_shard`: a truncated or garbage shard,
            or a sample count other than the index's, is a one-line error). False: only the cheap checks (the
            shard exists and has the index's size); a shard that then fails to read has its samples skipped and
            counted like unreadable images.
    """

    key = KEY

    def __init__(self, urls: str | Sequence[str] | None = None, cache_dir: str | None = None, lru_size: int = 64,
                 verify: bool = True) -> None:
        self.urls = urls if urls is None or isinstance(urls, str) else list(urls)
        self.cache_dir = cache_dir
        self.lru_size = int(lru_size)
        self.verify = bool(verify)
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
            self._shards, self._classes = resolve_shards(urls, verify=self.verify)
            self._offsets = np.concatenate([[0], np.cumsum([int(s["nsamples"]) for s in self._shards])]).astype(np.int64)
        return self._shards

    # -- reading through wids --------------------------------------------------------------------------
    def _reader(self, entry: dict) -> Any:
        from wids.wids import IndexedTarSamples
        from wids.wids_dl import download_and_open
        from wids.wids_lru import LRUCache

        url = entry["url"]
        if self._readers is None or self._pid != os.getpid():
            self._readers, self._pid = LRUCache(self.lru_size, release_handler=lambda _k, v: v.close()), os.getpid()
            self._broken: dict[str, str] = {}
        if url in self._broken:  # tried once in this process: its other samples fail at once
            raise ShardReadError(self._broken[url])
        if url not in self._readers:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # wids prints the header it cannot parse
                    if _is_remote(url):
                        from wids.wids import DefaultLocalname

                        cache = self.cache_dir or os.path.join(_cache_base(), "shards")
                        local = DefaultLocalname(cache)(url)
                        with download_and_open(url, local) as stream:
                            reader = IndexedTarSamples(path=local, stream=stream)
                    else:
                        if not stat.S_ISREG(os.stat(url).st_mode):
                            raise ShardReadError(f"{url} is not a regular file")
                        stream = open(url, "rb")  # noqa: SIM115 - the reader owns it (closed with it)
                        try:
                            reader = IndexedTarSamples(path=url, stream=stream)
                        except BaseException:
                            stream.close()
                            raise
            except Exception as exc:  # noqa: BLE001 - wids raises struct, Unicode, value and assertion errors alike
                self._broken[url] = f"shard {url} cannot be read: {type(exc).__name__}: {exc}"
                raise ShardReadError(self._broken[url]) from None
            self._readers[url] = reader
        return self._readers[url]

    def locate(self, position: int) -> tuple[dict, int]:
        shards = self.shards()
        shard = int(np.searchsorted(self._offsets, position, side="right") - 1)
        return shards[shard], int(position - self._offsets[shard])

    def raw(self, position: int) -> dict:
        """Sample ``position``'s members ``{".jpg": bytes, ".cls": bytes, "__key__": ...}``; a sample that the
        shard does not hold (fewer samples than its index says) or cannot parse raises :class:`ShardReadError`."""
        entry, local = self.locate(position)
        reader = self._reader(entry)
        if local >= len(reader):
            raise ShardReadError(f"shard {entry['url']} has {len(reader)} samples, its index says {entry['nsamples']}")
        try:
            sample = reader[local]
        except Exception as exc:  # noqa: BLE001 - a cut or garbled member: wids raises what its parser meets
            raise ShardReadError(f"{type(exc).__name__}: {exc}") from None
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
