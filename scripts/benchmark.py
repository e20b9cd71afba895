"""Training-step throughput, peak memory and data-loader throughput of the pretraining methods.

    python scripts/benchmark.py method=mae backbone=vit_b data.image_size=224 data.batch_size=8
    python scripts/benchmark.py --suite --out docs                  # the CPU table of docs/benchmarks.md
    python scripts/benchmark.py --suite --device cuda --precision bf16 --compile off,on --out docs/gpu
    python scripts/benchmark.py method=simmim backbone=swin_b data.image_size=192 data.batch_size=128 \\
        --device cuda --precision bf16 --peak-tflops 989

Takes the Hydra overrides of ``python -m mim_lightning.train`` (with no ``experiment=`` the ``demo``
experiment applies: ``vit_micro`` at 64 px) and builds what a run builds: the method's
``PretrainModule`` (``build_pretrain_module``), its optimizer and schedule from ``configure_optimizers``
(fused AdamW on CUDA), and one real batch (images and masks) from its DataModule (``build_datamodule``).

For each case (device x precision x compile) it times the training step Lightning runs, in a plain loop:
batch to the device (the mask stays on the host, as ``PretrainModule.transfer_batch_to_device`` does),
forward and loss under ``torch.autocast(device, bfloat16)`` for ``bf16`` (what ``bf16-mixed`` does),
backward, the gradient norm the module logs, optimizer step, scheduler step, ``zero_grad``. It reports
the median of ``--steps`` steps after ``--warmup`` steps (the device is synchronised around each step),
images/s, peak memory (CUDA ``max_memory_allocated``; on the CPU the peak resident set size of the
process, reset per measurement through ``/proc/self/clear_refs``), model FLOPs per step (forward +
backward, counted with ``torch.utils.flop_counter.FlopCounterMode`` during the first warm-up step) and
model FLOPs utilisation ``FLOPs/step / step time / peak`` with ``--peak-tflops`` (known for some GPUs).

Baselines measured in the same run, as ratios:
- ``vs supervised``: the method's images/s over plain supervised training of its backbone at the same batch,
  size, precision and compile setting: ``timm.create_model`` of the family (ViT: ``vit_base_patch16_224``,
  Swin: ``swin_base_patch4_window7_224`` with the method's window) with the backbone's sizes,
  ``num_classes=1000``, cross-entropy, AdamW. timm has no HiViT, so iTPN is compared with the project's
  HiViT classifier (the finetuning model). Swin attention runs through SDPA in both.
- ``visible / all tokens`` (MAE only): MAE over :class:`MAEAllTokens`, the same ViT encoder and decoder
  run on all patches with a learned mask token at the hidden ones: what MAE saves by dropping them.

The DataModule is also timed on its own (decode + augment + mask + collate): ``--loader-batches`` batches
with ``num_workers=0`` and with the configured ``data.num_workers``, after the first batch (worker start-up).
The demo data are small PNGs; pass ``data=folder data.root=...`` to measure your own images.

``--loader-table`` instead measures the loader alone on ImageNet-like JPEGs (see :func:`loader_table`).

Writes ``<out>/benchmarks.jsonl`` (one JSON object per case) and ``<out>/benchmarks.md`` (the command,
the machine and the table), and prints each case as it finishes. ``--suite`` runs :data:`SUITE`.
Exit status 2 with a one-line message for a bad configuration.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import logging
import math
import platform
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import nn

from mim_lightning import ConfigError, build_datamodule, build_mask_generator, build_pretrain_module, compose
from mim_lightning.api import compile_kwargs
from mim_lightning.methods.mae.model import MaskedAutoencoder
from mim_lightning.models.output import MIMOutput
from mim_lightning.models.tokens import device_unit_mask
from mim_lightning.optim import compile_in_place, make_optimizer

#: ``--suite``: every method at a small backbone, then the base sizes at batch 8 (224 px; SimMIM's Swin at
#: its 192 px recipe size). Overrides given on the command line are appended to every entry.
SUITE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MAE ViT-S", ("method=mae", "backbone=vit_s", "data.image_size=224", "data.batch_size=8")),
    ("SimMIM Swin-T", ("method=simmim", "backbone=swin_t", "data.image_size=192", "data.batch_size=8")),
    ("MixMAE Swin-T", ("method=mixmae", "backbone=swin_t", "data.image_size=224", "data.batch_size=8")),
    ("iTPN HiViT-T", ("method=itpn", "backbone=hivit_t", "data.image_size=224", "data.batch_size=8")),
    ("MAE ViT-B", ("method=mae", "backbone=vit_b", "data.image_size=224", "data.batch_size=8")),
    ("SimMIM Swin-B", ("method=simmim", "backbone=swin_b", "data.image_size=192", "data.batch_size=8")),
    ("MixMAE Swin-B", ("method=mixmae", "backbone=swin_b", "data.image_size=224", "data.batch_size=8")),
    ("iTPN HiViT-B", ("method=itpn", "backbone=hivit_b", "data.image_size=224", "data.batch_size=8")),
)
#: Steps of ``--suite`` unless given: the whole CPU suite then takes about 10 minutes on 2 cores.
SUITE_STEPS, SUITE_WARMUP, SUITE_LOADER_BATCHES = 3, 1, 8

#: Dense peak TFLOP/s by (GPU name fragment, precision), from the vendors' data sheets (no sparsity);
#: fp32 means plain fp32 (PyTorch's default matmul precision, no TF32). The first matching fragment wins.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
)
PRECISIONS = ("fp32", "bf16")
log = logging.getLogger("mim_lightning.benchmark")


# ------------------------------------------------------------------------------------- the MAE baseline
class MAEAllTokens(MaskedAutoencoder):
    """Benchmark-only baseline: MAE with its encoder run on **all** patches, hidden ones replaced by a
    learned ``encoder_mask_token`` (the SimMIM/BEiT way), so that it costs what MAE avoids by dropping them.

    Same ViT encoder (patch embedding, fixed sin-cos positions, cls token, blocks, norm), same decoder and
    same loss as :class:`~mim_lightning.methods.mae.model.MaskedAutoencoder`; the decoder receives every token, so it
    inserts no mask tokens of its own. This is the "encoder w/ [M]" row of the MAE paper's Table 1c,
    whose wall-clock comparison (3.5x for ViT-L with the 8-block decoder) the ratio reproduces.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
        nn.init.normal_(self.encoder_mask_token, std=0.02)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        batch = images.shape[0]
        flat_mask, _ = device_unit_mask(mask, batch, self.grid, self.mask_generator, images.device)
        encoder = self.encoder
        x = encoder.patch_embed(images)
        hidden = flat_mask.unsqueeze(-1)
        x = torch.where(hidden, self.encoder_mask_token.to(x.dtype), x) + encoder.pos_embed[:, 1:]
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in encoder.blocks:
            x = block(x)
        latent = encoder.norm(x)
        length = flat_mask.shape[1]
        identity = torch.arange(length, device=images.device).expand(batch, length)
        return self.reconstruction_output(images, self.decoder(latent, identity), flat_mask, latent)


def mae_all_tokens_module(cfg: Any, module_class: type, recipe: dict[str, Any]) -> Any:
    """A pretraining module of ``module_class`` with the MAE run's optimizer ``recipe`` around
    :class:`MAEAllTokens`, built from the config's MAE arguments."""
    kwargs = OmegaConf.to_container(cfg.method.model, resolve=True)
    kwargs.pop("_target_", None)
    return module_class(MAEAllTokens(**kwargs, mask_generator=build_mask_generator(cfg)), **recipe)


# ------------------------------------------------------------------------------ supervised baselines
def swin_window(model: nn.Module) -> int | None:
    """The attention window of a Swin-family method's encoder (MixMIM: the first stage's), else None."""
    encoder = getattr(model, "encoder", None)
    if hasattr(encoder, "windows") and encoder.windows and isinstance(encoder.windows[0], int):
        return int(encoder.windows[0])  # MixMIM: one window per stage
    return int(encoder.window_size) if hasattr(encoder, "window_size") else None


def supervised_model(cfg: Any, window: int | None) -> tuple[nn.Module, str]:
    """Plain supervised classifier of the method's backbone (1000 classes) and a name for it; a Swin uses
    the method's ``window`` (SimMIM: 6 at 192 px; MixMAE: 14, which timm clamps to global attention on
    maps not larger than the window, as MixMIM does)."""
    import timm

    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    family = backbone.get("family")
    size = int(cfg.data.image_size)
    if family == "vit":
        name = "vit_base_patch16_224"
        model = timm.create_model(name, pretrained=False, num_classes=1000, img_size=size,
                                  patch_size=int(backbone["patch_size"]), embed_dim=int(backbone["embed_dim"]),
                                  depth=int(backbone["depth"]), num_heads=int(backbone["num_heads"]),
                                  mlp_ratio=float(backbone.get("mlp_ratio", 4.0)))
    elif family == "swin":
        from mim_lightning.models.backbones.swin import use_sdpa_window_attention

        window = 7 if window is None else int(window)
        name = "swin_base_patch4_window7_224"
        model = timm.create_model(name, pretrained=False, num_classes=1000, img_size=size,
                                  patch_size=int(backbone.get("patch_size", 4)), embed_dim=int(backbone["embed_dim"]),
                                  depths=tuple(backbone["depths"]), num_heads=tuple(backbone["num_heads"]),
                                  window_size=window, mlp_ratio=float(backbone.get("mlp_ratio", 4.0)))
        use_sdpa_window_attention(model)
        name = f"{name} (window {window})"
    elif family == "hivit":
        from mim_lightning.models.classifiers.hivit import HiViTBuilder

        model = HiViTBuilder(backbone, size).build(1000).model
        name = "HiViTClassifier (project; timm has no HiViT)"
    else:
        raise ConfigError("backbone", family, "vit, swin or hivit backbones for the supervised baseline")
    return model, name


# ----------------------------------------------------------------------------------- measurement tools
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> str:
    """Start a peak-memory measurement; returns how the peak is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
        return "rss_hwm"
    except OSError:
        return "ru_maxrss_process"  # cannot be reset: the process-wide peak so far


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def count_flops(function: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``function`` under ``FlopCounterMode`` (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = function()
    return result, int(counter.get_total_flops())


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device,
               flops: bool = True, compiled: bool = False) -> dict[str, Any]:
    """Warm up, then time ``steps`` steps one by one (the device is synchronised after each). FLOPs are counted
    in the first warm-up step, or, for a compiled model (which runs eagerly under the counter), in an extra
    step before the warm-up, so that compilation happens in the warm-up. Returns median/all step times,
    FLOPs per step and peak memory."""
    kind = reset_peak_memory(device)
    step_flops = None
    if flops:
        _, step_flops = count_flops(step)
    for _ in range(warmup - (0 if compiled or not flops else 1)):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "step_s_all": times, "flops_per_step": step_flops,
            "peak_mem_mb": peak_memory_mb(device), "peak_mem_kind": kind}


class StandInTrainer:
    """What ``configure_optimizers`` reads from a Trainer: one device, no accumulation, ``steps`` batches."""

    world_size = 1
    accumulate_grad_batches = 1
    global_step = 0
    current_epoch = 0
    global_rank = 0

    def __init__(self, steps: int, precision: str) -> None:
        self.estimated_stepping_batches = steps
        self.num_training_batches = steps
        self.precision = "bf16-mixed" if precision == "bf16" else "32-true"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def pretrain_step(module: Any, cpu_batch: dict, device: torch.device, precision: str,
                  channels_last: bool) -> Callable[[], Any]:
    """The module's training step as Lightning runs it, on ``module``'s own optimizer and schedule."""
    module.trainer = StandInTrainer(1000, precision)
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"]
    scheduler = configured["lr_scheduler"]["scheduler"]
    model = module.model

    def step() -> torch.Tensor:
        batch = module.transfer_batch_to_device(cpu_batch, device, 0)
        images = batch["images"].contiguous(memory_format=torch.channels_last) if channels_last else batch["images"]
        with autocast(device, precision):
            loss = model(images, mask=batch.get("mask")).loss
        loss.backward()
        module.gradient_norm()  # train/grad_norm, computed before every optimizer step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def supervised_step(model: nn.Module, cpu_images: torch.Tensor, device: torch.device, precision: str,
                    channels_last: bool) -> Callable[[], Any]:
    """Plain supervised training: cross-entropy on random labels, AdamW (fused on CUDA)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = make_optimizer(torch.optim.AdamW, [{"params": decay, "weight_decay": 0.05},
                                                   {"params": no_decay, "weight_decay": 0.0}], 1e-4, device)
    labels = torch.randint(0, 1000, (cpu_images.shape[0],), generator=torch.Generator().manual_seed(0))

    def step() -> torch.Tensor:
        images = cpu_images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def peak_tflops(device: torch.device, precision: str, given: float | None) -> float | None:
    if given is not None:
        return float(given)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, table in PEAK_TFLOPS:
        if fragment in name:
            return table[precision]
    return None


# ----------------------------------------------------------------------------------------- the loader
def measure_loader(cfg: Any, workers: int, batches: int) -> dict[str, Any]:
    """The DataModule's training loader on its own: images/s over ``batches`` batches after the first."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.num_workers = int(workers)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not counted
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        images += int(batch["images"].shape[0])
    elapsed = time.perf_counter() - start
    del iterator, loader, datamodule
    gc.collect()
    rate = images / elapsed
    return {"workers": int(workers), "images_per_sec": rate, "images_per_sec_per_worker": rate / max(1, workers)}


def first_batch(cfg: Any) -> dict:
    """One real training batch (images and masks as the DataModule makes them), built without workers."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.num_workers = 0
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}


# -------------------------------------------- issue #19: timm reference encoders and the Lightning overhead
def reference_encoder(model: nn.Module) -> tuple[nn.Module, str] | None:
    """A timm encoder at the method encoder's geometry, with timm's own attention defaults (explicit softmax
    for Swin, ``fused_attn`` SDPA for ViT), or None where timm has none (HiViT). Swin: ``SwinTransformer``
    with the method's window (SimMIM: 6 at 192 px; MixMIM: 14, clamped by timm to global attention on maps
    not larger than it, as MixMIM does; timm shifts every second block, MixMIM never does)."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    encoder = getattr(model, "encoder", None)
    if encoder is None or type(model).__name__ == "ITPNPixel" or not hasattr(encoder, "img_size"):
        return None
    size = tuple(encoder.img_size)
    if hasattr(encoder, "layers"):  # a Swin (SimMIM's SwinEncoder or MixMIM's encoder)
        stages = list(encoder.layers)
        blocks = [stage.blocks for stage in stages]
        window = swin_window(model)
        first = blocks[0][0]
        heads = [stage_blocks[0].attn.num_heads for stage_blocks in blocks]
        mlp_ratio = first.mlp.fc1.out_features / first.mlp.fc1.in_features
        reference = SwinTransformer(img_size=size, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
                                    depths=[len(b) for b in blocks], num_heads=heads, window_size=window,
                                    mlp_ratio=mlp_ratio, num_classes=0)
        return reference, f"timm SwinTransformer (window {window}, explicit softmax)"
    if hasattr(encoder, "blocks"):  # a ViT
        first = encoder.blocks[0]
        reference = VisionTransformer(img_size=size, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
                                      depth=len(encoder.blocks), num_heads=first.attn.num_heads,
                                      mlp_ratio=first.mlp.fc1.out_features / first.mlp.fc1.in_features, num_classes=0)
        return reference, "timm VisionTransformer (fused SDPA)"
    return None


def encoder_call(model: nn.Module, mask: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The method's encoder on all tokens as the method runs it (SimMIM: with its mask token; MixMAE: mixing
    with its same-image restriction; MAE: all patches, as the reference)."""
    encoder = model.encoder
    name = type(model).__name__
    if name == "SimMIM":
        return lambda images: encoder.forward_tokens(images, model.check_mask(mask, images.shape[0]).to(images.device))
    if name == "MixMAE":
        return lambda images: encoder(images, model.check_mask(mask.to(images.device)))
    return lambda images: encoder(images)


def encoder_step(forward: Callable[[torch.Tensor], torch.Tensor], params: Any, cpu_images: torch.Tensor,
                 device: torch.device, precision: str) -> Callable[[], Any]:
    """Forward + ``mean(features^2)`` + backward + AdamW: an encoder's share of a training step."""
    optimizer = make_optimizer(torch.optim.AdamW, [p for p in params if p.requires_grad], 1e-4, device)

    def step() -> torch.Tensor:
        images = cpu_images.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = forward(images).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def alternate(steps: dict[str, Callable[[], Any]], warmup: int, count: int, device: torch.device) -> dict[str, list[float]]:
    """Run the steps in turn (order reversed every round), ``warmup`` rounds untimed: per-step times."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(count):
        for name in (names if index % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(top: Sequence[float], bottom: Sequence[float]) -> float:
    """Median of the per-step ratios (steps timed alternately, so slow phases of a busy machine cancel)."""
    return statistics.median(a / b for a, b in zip(top, bottom))


def measure_reference(model: nn.Module, cpu_batch: dict, device: torch.device, precision: str,
                      args: argparse.Namespace, compiled: bool, options: dict) -> dict[str, Any] | None:
    """The method's encoder against its timm reference, alternately in this process: ``encoder_vs_reference``
    is the median per-step time ratio (above 1 = ours is slower; the target is at most 1.05)."""
    built = reference_encoder(model)
    if built is None:
        return None
    reference, name = built
    torch.manual_seed(0)
    reference = reference.to(device)
    compile_in_place(reference, compiled, options)
    images = cpu_batch["images"]
    ours = encoder_step(encoder_call(model, cpu_batch.get("mask")), model.encoder.parameters(), images, device, precision)
    theirs = encoder_step(reference.forward_features, reference.parameters(), images, device, precision)
    times = alternate({"ours": ours, "reference": theirs}, args.warmup, args.steps, device)
    return {"model": name, "encoder_step_s": statistics.median(times["ours"]),
            "reference_step_s": statistics.median(times["reference"]),
            "encoder_vs_reference": median_ratio(times["ours"], times["reference"])}


class _StepTimer:
    """A Lightning callback: the time between the starts of consecutive training batches (the whole loop step)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class StepTimer(Callback):
            def __init__(self) -> None:
                self.starts: list[float] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self.starts.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module) -> None:
                self.starts.append(time.perf_counter())

            def steps(self) -> list[float]:
                return [b - a for a, b in zip(self.starts, self.starts[1:])]

        return StepTimer()


def lightning_overhead(cfg: Any, cpu_batch: dict, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """The full ``trainer.fit`` step (loader, hooks, logging, precision plugin, optimizer and schedule through
    Lightning) against the bare step of :func:`pretrain_step` in a plain loop, on the same batch, on the CPU.
    Blocks of ``--steps`` steps alternate (fit, bare, fit, bare); ``lightning_overhead`` is the ratio of the
    medians minus 1 (target under 5 %)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Dataset

    class Repeat(Dataset):
        def __len__(self) -> int:
            return args.steps + args.warmup

        def __getitem__(self, index: int) -> dict:
            return cpu_batch

    device = torch.device("cpu")
    torch.manual_seed(int(cfg.seed))
    fit_module = build_pretrain_module(cfg)
    torch.manual_seed(int(cfg.seed))
    bare_module = build_pretrain_module(cfg)
    bare = pretrain_step(bare_module, cpu_batch, device, precision, False)
    fit_times: list[float] = []
    bare_times: list[float] = []
    for _ in range(2):
        timer = _StepTimer()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps + args.warmup, max_epochs=1,
                             precision="bf16-mixed" if precision == "bf16" else "32-true", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
        trainer.fit(fit_module, train_dataloaders=DataLoader(Repeat(), batch_size=None))
        fit_times += timer.steps()[args.warmup:]
        bare_times += alternate({"bare": bare}, args.warmup, args.steps, device)["bare"]
    fit_s, bare_s = statistics.median(fit_times), statistics.median(bare_times)
    return {"fit_step_s": fit_s, "bare_step_s": bare_s, "lightning_overhead": fit_s / bare_s - 1.0}


# ------------------------------------------------------------------------------------------- one config
def target_name(node: Any, module: bool = False) -> str | None:
    """The class (or, with ``module``, the module) a config node's ``_target_`` names."""
    target = str(node.get("_target_", "")) if node is not None else ""
    parts = target.split(".")
    return (parts[-2] if module else parts[-1]) if len(parts) > 1 else None


def case_header(cfg: Any, label: str | None) -> dict[str, Any]:
    target = str(cfg.method.model.get("_target_", "")).split(".")
    # methods/<method>/model.py names the method by its package
    method = (target[target.index("methods") + 1] if "methods" in target[:-1]
              else target_name(cfg.method.model, module=True))
    backbone = str(cfg.backbone.get("name", "?"))
    return {"label": label or f"{method} {backbone}", "method": method, "backbone": backbone,
            "image_size": int(cfg.data.image_size), "batch_size": int(cfg.data.batch_size),
            "data": target_name(cfg.data.get("source")), "mask": target_name(cfg.get("mask"))}


def measure(step_fn: Callable[[], Callable[[], Any]], args: argparse.Namespace, device: torch.device,
            batch_size: int, precision: str, compiled: bool) -> dict[str, Any]:
    step = step_fn()
    result = time_steps(step, args.warmup, args.steps, device, flops=not args.no_flops, compiled=compiled)
    result["images_per_sec"] = batch_size / result["step_s"]
    peak = peak_tflops(device, precision, args.peak_tflops)
    flops = result.get("flops_per_step")
    result["tflops_per_sec"] = flops / result["step_s"] / 1e12 if flops else None
    result["mfu"] = result["tflops_per_sec"] / peak if flops and peak else None
    result["peak_tflops"] = peak
    return result


def run_config(label: str | None, overrides: list[str], args: argparse.Namespace,
               emit: Callable[[dict[str, Any]], None]) -> None:
    """Every case (device x precision x compile) of one config, with its baselines and the loader."""
    cfg = compose("pretrain", overrides)
    header = case_header(cfg, label)
    batch_size = header["batch_size"]
    options = compile_kwargs(cfg)
    loader: dict[str, Any] = {}
    if not args.no_loader:
        workers = int(cfg.data.num_workers) if args.loader_workers is None else int(args.loader_workers)
        loader["workers0"] = measure_loader(cfg, 0, args.loader_batches)
        if workers > 0:
            loader["workersN"] = measure_loader(cfg, workers, args.loader_batches)
    cpu_batch = first_batch(cfg)
    for device_name in args.devices:
        device = torch.device(device_name)
        if device.type == "cuda":
            cpu_batch = {key: value.pin_memory() for key, value in cpu_batch.items()}
        for precision in precisions_for(device, args):
            for compiled in args.compiles:
                log.info("[benchmark] %s: %s %s compile=%s", header["label"], device_name, precision, "on" if compiled else "off")
                record = dict(header, device=device_name, device_name=device_description(device), precision=precision,
                              compile=compiled, channels_last=bool(args.channels_last), steps=args.steps,
                              warmup=args.warmup, overrides=list(overrides))
                built: dict[str, Any] = {}

                def method_step(factory: Callable[[], Any]) -> Callable[[], Callable[[], Any]]:
                    def make() -> Callable[[], Any]:
                        torch.manual_seed(int(cfg.seed))
                        module = factory().to(device)
                        if args.channels_last:
                            module.to(memory_format=torch.channels_last)
                        compile_in_place(module.model, compiled, options)
                        built["module"] = module
                        return pretrain_step(module, cpu_batch, device, precision, args.channels_last)
                    return make

                result = measure(method_step(lambda: build_pretrain_module(cfg)), args, device, batch_size, precision,
                                 compiled)
                module = built.pop("module")
                record["params_m"] = sum(p.numel() for p in module.model.parameters()) / 1e6
                record["window_attention"] = window_attention_path(module.model, device, precision)
                record.update(result)
                is_mae = type(module.model) is MaskedAutoencoder
                recipe = (type(module), dict(optimizer=module.optimizer_factory, weight_decay=module.weight_decay,
                                             no_weight_decay=module.no_weight_decay,
                                             no_weight_decay_keys=module.no_weight_decay_keys, lr=module.lr_config,
                                             batch_size=module.batch_size))
                window = swin_window(module.model)
                del module
                if not args.no_baselines:
                    if is_mae:
                        all_tokens = measure(method_step(lambda: mae_all_tokens_module(cfg, *recipe)), args, device,
                                             batch_size, precision, compiled)
                        built.clear()
                        record["all_tokens"] = summary(all_tokens)
                        record["visible_vs_all_tokens"] = result["images_per_sec"] / all_tokens["images_per_sec"]

                    def make_supervised() -> Callable[[], Any]:
                        torch.manual_seed(int(cfg.seed))
                        model, built["name"] = supervised_model(cfg, window)
                        model = model.to(device)
                        if args.channels_last:
                            model.to(memory_format=torch.channels_last)
                        compile_in_place(model, compiled, options)
                        return supervised_step(model, cpu_batch["images"], device, precision, args.channels_last)

                    supervised = measure(make_supervised, args, device, batch_size, precision, compiled)
                    record["supervised"] = dict(summary(supervised), model=built.pop("name"))
                    record["vs_supervised"] = result["images_per_sec"] / supervised["images_per_sec"]
                if args.baseline:  # issue #19: the encoder against timm's, alternately
                    torch.manual_seed(int(cfg.seed))
                    reference_module = build_pretrain_module(cfg).to(device)
                    compile_in_place(reference_module.model.encoder, compiled, options)
                    reference = measure_reference(reference_module.model, cpu_batch, device, precision, args,
                                                  compiled, options)
                    del reference_module
                    if reference is not None:
                        record["reference"] = reference
                        record["encoder_vs_reference"] = reference["encoder_vs_reference"]
                    if args.lightning_overhead and device.type == "cpu" and not compiled:
                        record["lightning"] = lightning_overhead(cfg, cpu_batch, precision, args)
                        record["lightning_overhead"] = record["lightning"]["lightning_overhead"]
                gc.collect()
                record["loader"] = loader
                feeding = loader.get("workersN") or loader.get("workers0")
                record["loader_vs_model"] = feeding["images_per_sec"] / result["images_per_sec"] if feeding else None
                emit(record)


def window_attention_path(model: nn.Module, device: torch.device, precision: str) -> str | None:
    """The window-attention path a Swin-family encoder takes here (None for the others)."""
    from mim_lightning.models.backbones.window_attention import attention_path

    if not hasattr(getattr(model, "encoder", None), "layers"):
        return None
    return attention_path(device, torch.bfloat16 if precision == "bf16" else torch.float32)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("images_per_sec", "step_s", "peak_mem_mb", "flops_per_step", "tflops_per_sec", "mfu")
    return {key: result.get(key) for key in keys}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if match:
            name = match.group(1).strip()
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------------------------- output
def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


TABLE_HEADER = ("| case | device | precision | compile | img/s | step (ms) | peak mem (MB) | GFLOP/img | MFU "
                "| vs supervised | visible / all tokens | loader img/s (0 workers) | loader img/s per worker "
                "| loader / model | attention | encoder / timm ref | Lightning overhead |")


def table_row(record: dict[str, Any]) -> str:
    loader = record.get("loader") or {}
    zero = (loader.get("workers0") or {}).get("images_per_sec")
    many = loader.get("workersN")
    per_worker = f"{many['images_per_sec_per_worker']:.0f} (x{many['workers']})" if many else "-"
    flops = record.get("flops_per_step")
    gflop_img = f"{flops / record['batch_size'] / 1e9:.3g}" if flops else "-"
    mfu = record.get("mfu")
    case = f"{record['label']} {record['image_size']}px b{record['batch_size']}"
    overhead = record.get("lightning_overhead")
    return (f"| {case} | {record['device']} | {record['precision']} | {'on' if record['compile'] else 'off'} "
            f"| {fmt(record['images_per_sec'])} | {fmt(record['step_s'] * 1e3, 0)} | {fmt(record['peak_mem_mb'], 0)} "
            f"| {gflop_img} | {fmt(None if mfu is None else 100 * mfu, 1, '%')} "
            f"| {fmt(record.get('vs_supervised'), 2, 'x')} | {fmt(record.get('visible_vs_all_tokens'), 2, 'x')} "
            f"| {fmt(zero, 0)} | {per_worker} | {fmt(record.get('loader_vs_model'), 1, 'x')} "
            f"| {record.get('window_attention') or '-'} | {fmt(record.get('encoder_vs_reference'), 2, 'x')} "
            f"| {fmt(None if overhead is None else 100 * overhead, 1, '%')} |")


def markdown(records: list[dict[str, Any]], command: str) -> str:
    import timm

    devices = sorted({f"{r['device']}: {r['device_name']}" for r in records})
    lines = [
        "# Benchmarks",
        "",
        f"Made by `{command}` on {_dt.date.today().isoformat()} (torch {torch.__version__}, timm {timm.__version__}).",
        "",
        *[f"- {d}" for d in devices],
        "",
        "Training step as Lightning runs it (batch to device, forward + loss, backward, gradient norm, AdamW, "
        "schedule, zero_grad), median over the timed steps; `img/s` = batch / median step. Peak memory: CUDA "
        "max allocated, or the peak resident memory of the process on the CPU. GFLOP/img: model FLOPs of "
        "forward + backward per image (FlopCounterMode). `vs supervised`: the method's img/s over timm "
        "supervised training of the same backbone (cross-entropy, AdamW) at the same batch, size and "
        "precision (above 1 = the method's step is faster). `visible / all tokens`: MAE over the same ViT run on "
        "all patches with a mask token (the paper reports about 3x for ViT-L). Loader: the DataModule alone "
        "(decode, crop, flip, normalize, mask, collate); `loader / model` is the loader with its configured workers "
        "over the model's img/s (below 1 = the loader cannot keep up). `attention`: the window-attention path of a Swin "
        "encoder (mim_lightning.models.backbones.window_attention). `encoder / timm ref` (--baseline): the method's "
        "encoder step (forward, mean square, backward, AdamW) over timm's encoder at the same geometry with timm's "
        "attention defaults, timed alternately in one process, median of per-step ratios (above 1 = ours is slower). "
        "`Lightning overhead` (--lightning-overhead): the trainer.fit step over the bare step on the same batch, minus 1.",
        "",
        TABLE_HEADER,
        "|" + "---|" * (TABLE_HEADER.count("|") - 1),
        *[table_row(r) for r in records],
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def parse_list(text: str, allowed: Sequence[str], key: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ConfigError(key, text, ", ".join(allowed))
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for mim_lightning.train")
    parser.add_argument("--suite", action="store_true", help="run SUITE (every method, small and base sizes)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or both (cpu,cuda); auto: cuda if present")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or fp32,bf16; auto: bf16 on cuda, fp32 on cpu "
                        "(--suite: fp32,bf16 on cpu)")
    parser.add_argument("--compile", default="off", help="off, on or off,on (torch.compile, compile_kwargs.*)")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps (default 10; --suite {SUITE_STEPS})")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up steps (default 3; --suite {SUITE_WARMUP})")
    parser.add_argument("--loader-batches", type=int, default=None,
                        help=f"batches timed per loader setting (default 20; --suite {SUITE_LOADER_BATCHES})")
    parser.add_argument("--loader-workers", type=int, default=None, help="workers of the second loader run "
                        "(default data.num_workers)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (known for H100/H200/A100/L4/L40S/A10 otherwise)")
    parser.add_argument("--channels-last", action="store_true", help="images and model in channels-last memory format")
    parser.add_argument("--no-baselines", action="store_true", help="skip the supervised and all-tokens baselines")
    parser.add_argument("--baseline", action="store_true", help="also time each method's encoder against a timm "
                        "reference encoder (explicit-attention defaults), alternately in this process")
    parser.add_argument("--lightning-overhead", action="store_true", help="with --baseline: the trainer.fit step "
                        "against the bare step on the same batch (CPU, compile off)")
    parser.add_argument("--no-loader", action="store_true", help="skip the loader measurement")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (and MFU)")
    parser.add_argument("--out", default="outputs/benchmark", help="folder for benchmarks.jsonl and benchmarks.md")
    parser.add_argument("--dry-run", action="store_true", help="print the cases and exit")
    parser.add_argument("--loader-table", action="store_true", help="only the loader table on ImageNet-like JPEGs "
                        "(data.fast_decode off/on); see loader_table()")
    parser.add_argument("--loader-images", type=int, default=340, help="images timed per loader-table row")
    parser.add_argument("--gpu-img-s", type=float, default=None, help="model img/s of one GPU (the GPU table), for "
                        "the workers it needs")
    args = parser.parse_args(argv)
    devices = ["cuda" if torch.cuda.is_available() else "cpu"] if args.device == "auto" else \
        parse_list(args.device, ("cpu", "cuda"), "--device")
    if "cuda" in devices and not torch.cuda.is_available():
        raise ConfigError("--device", args.device, "cpu (no CUDA device here)")
    args.devices = devices
    # auto: per device, bf16 on CUDA (trainer=auto's bf16-mixed); fp32 on the CPU, and bf16 too in the suite
    args.precisions = None if args.precision == "auto" else parse_list(args.precision, PRECISIONS, "--precision")
    args.compiles = [v == "on" for v in parse_list(args.compile, ("off", "on"), "--compile")]
    args.steps = args.steps if args.steps is not None else (SUITE_STEPS if args.suite else 10)
    args.warmup = args.warmup if args.warmup is not None else (SUITE_WARMUP if args.suite else 3)
    args.loader_batches = args.loader_batches if args.loader_batches is not None else (
        SUITE_LOADER_BATCHES if args.suite else 20)
    if args.steps < 1 or args.warmup < 1 or args.loader_batches < 1:
        raise ConfigError("--steps/--warmup/--loader-batches", f"{args.steps}/{args.warmup}/{args.loader_batches}",
                          "at least 1 each")
    return args


def precisions_for(device: torch.device, args: argparse.Namespace) -> list[str]:
    if args.precisions is not None:
        return list(args.precisions)
    if device.type == "cuda":
        return ["bf16"]
    return ["fp32", "bf16"] if args.suite else ["fp32"]


def cases(args: argparse.Namespace) -> list[tuple[str | None, list[str]]]:
    if args.suite:
        return [(label, [*overrides, *args.overrides]) for label, overrides in SUITE]
    return [(None, list(args.overrides))]


# ------------------------------------------------------------------------------------------ loader table
#: ImageNet-like JPEG sizes of the loader table (the typical ImageNet photo, and a large camera photo).
LOADER_SIZES = ((500, 375), (1600, 1200))


def make_jpegs(folder: Path, size: tuple[int, int], count: int = 17, quality: int = 90) -> Path:
    """The demo photos resized (bicubic) to ``size`` and saved as JPEG ``quality`` into ``folder``."""
    from PIL import Image

    from mim_lightning.data.demo import _photos

    folder.mkdir(parents=True, exist_ok=True)
    for number, (name, array) in enumerate(sorted(_photos().items())[:count]):
        image = Image.fromarray(array).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        image.save(folder / f"{name}.jpg", quality=quality)
    return folder


def loader_table(root: Path, images: int = 340, image_size: int = 224, gpu_img_s: float | None = None
                 ) -> list[dict[str, Any]]:
    """img/s of one loader worker (decode + MAE crop/flip + normalize + mask, in this process) on JPEGs of
    :data:`LOADER_SIZES`, with and without ``data.fast_decode``; the mean absolute pixel difference (0-255)
    of the fast crops from the full-decode ones (the same crop boxes); the workers a GPU needs at
    ``gpu_img_s`` model img/s (and per 1000 img/s). One torch thread, as in a DataLoader worker."""
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        rows = _loader_rows(root, images, image_size, gpu_img_s)
    finally:
        torch.set_num_threads(threads)
    return rows


def _loader_rows(root: Path, images: int, image_size: int, gpu_img_s: float | None) -> list[dict[str, Any]]:
    from mim_lightning.data import ImageFolderSource, PretrainDataModule
    from mim_lightning.masking import RandomMask

    rows = []
    for width, height in LOADER_SIZES:
        folder = make_jpegs(root / f"{width}x{height}", (width, height))
        datasets = {}
        for fast in (False, True):
            module = PretrainDataModule(ImageFolderSource(str(folder)), image_size=image_size, batch_size=8,
                                        num_workers=0, val_fraction=0.0, repeat=64, fast_decode=fast,
                                        mask_generator=RandomMask(image_size, 16, 0.75))
            module.setup("fit")
            datasets[fast] = module.train_dataset
        best = {False: 0.0, True: 0.0}
        for _round in range(3):  # interleaved rounds, the best of each: robust to other load on the machine
            for fast, dataset in datasets.items():
                dataset[(0, 0)]  # warm up (file cache, first decode)
                started = time.perf_counter()
                for index in range(images):
                    dataset[(index, 1)]
                best[fast] = max(best[fast], images / (time.perf_counter() - started))
        for fast in (False, True):
            rate = best[fast]
            row = {"kind": "loader", "jpeg": f"{width}x{height}", "fast_decode": fast, "img_s_per_worker": rate,
                   "workers_per_1000": 1000 / rate}
            if gpu_img_s:
                row["workers_at_gpu"] = math.ceil(gpu_img_s / rate)
            rows.append(row)
        std = torch.tensor(IMAGENET_MEAN_STD[1]).view(3, 1, 1)
        diffs = [((datasets[True][(i, 2)]["images"] - datasets[False][(i, 2)]["images"]) * std * 255).abs().mean().item()
                 for i in range(0, 64)]
        rows[-1]["pixel_diff"] = statistics.mean(diffs)
        rows[-1]["speedup"] = rows[-1]["img_s_per_worker"] / rows[-2]["img_s_per_worker"]
    return rows


IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def loader_markdown(rows: list[dict[str, Any]], gpu_img_s: float | None) -> str:
    gpu = f"workers at {gpu_img_s:g} model img/s" if gpu_img_s else "workers at the GPU's img/s (--gpu-img-s)"
    lines = [f"| JPEG (quality 90) | data.fast_decode | img/s per worker | workers per 1000 img/s | {gpu} | "
             "speed-up | mean abs pixel diff (0-255) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['jpeg']} | {str(row['fast_decode']).lower()} | {row['img_s_per_worker']:.0f} | "
                     f"{row['workers_per_1000']:.1f} | {row.get('workers_at_gpu', '-')} | "
                     f"{fmt(row.get('speedup'), 2, 'x')} | {fmt(row.get('pixel_diff'), 2)} |")
    return "\n".join(lines) + "\n"


def run_loader_table(args: argparse.Namespace) -> int:
    """``--loader-table``: the table above, written to ``<out>/loader.md`` and ``<out>/loader.jsonl``."""
    import tempfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = loader_table(Path(tmp), images=args.loader_images, gpu_img_s=args.gpu_img_s)
    (out / "loader.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = loader_markdown(rows, args.gpu_img_s)
    (out / "loader.md").write_text(text)
    print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        args = parse_args(argv)
        todo = cases(args)
        for label, overrides in todo:
            compose("pretrain", overrides)  # bad overrides fail before anything runs
    except ConfigError as error:
        print(f"mim_lightning: error: {error}", file=sys.stderr)
        return 2
    command = "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.loader_table:
        return run_loader_table(args)
    if args.dry_run:
        for label, overrides in todo:
            precisions = {d: precisions_for(torch.device(d), args) for d in args.devices}
            print(f"{label or 'run'}: {' '.join(overrides)} | precision {precisions} "
                  f"compile {args.compiles} steps {args.warmup}+{args.steps}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, table = out / "benchmarks.jsonl", out / "benchmarks.md"
    jsonl.write_text("")
    records: list[dict[str, Any]] = []
    started = time.perf_counter()

    def emit(record: dict[str, Any]) -> None:
        import timm

        record.update(torch=str(torch.__version__), timm=str(timm.__version__), threads=torch.get_num_threads(),
                      time=_dt.datetime.now().isoformat(timespec="seconds"))
        records.append(record)
        with jsonl.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        table.write_text(markdown(records, command))
        print(table_row(record), flush=True)

    try:
        for label, overrides in todo:
            run_config(label, overrides, args, emit)
    except ConfigError as error:
        print(f"mim_lightning: error: {error}", file=sys.stderr)
        return 2
    log.info("[benchmark] %d cases in %.0f s; wrote %s and %s", len(records), time.perf_counter() - started, jsonl, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
