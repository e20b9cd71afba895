"""Two-process runs for tests/test_fsdp.py, started with ``torch.distributed.run --nproc_per_node 2``.

``python tests/fsdp_worker.py <scenario> <out folder> <image folder> <class folder>``; every rank runs the
scenario's fits in order (the process group is made once and reused by each Trainer), rank 0 writes results.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import tiny_overrides  # noqa: E402

from mim_lightning import compose, pretrain  # noqa: E402

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


class StopAtStep:
    """A callback that ends training (as an interruption between two steps would) at ``step``."""

    def __new__(cls, step: int):
        from lightning.pytorch.callbacks import Callback

        class _Stop(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step >= step:
                    trainer.should_stop = True

        return _Stop()


def pretrain_args(run_dir: Path, images: str, *extra: str) -> list[str]:
    return [o for o in tiny_overrides(run_dir, "data=folder", f"data.root={images}", "data.repeat=1",
                                      "~callbacks.reconstructions", "trainer.max_steps=4", "trainer.max_epochs=2",
                                      "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.keep_last_k=1",
                                      "method.lr.base=0.05", "method.lr.warmup_steps=1",
                                      *extra)]


def group_names(trainer) -> list[list[str]]:
    """Each optimizer group's parameter names (unwrapped), to compare FSDP2's groups with DDP's."""
    from mim_lightning.optim import unwrapped_name

    from torch.distributed.fsdp import FSDPModule

    module = trainer.lightning_module
    for unit in module.modules():  # a validation forward leaves the root unit's parameters gathered
        if isinstance(unit, FSDPModule):
            unit.reshard()
    names = {id(p): unwrapped_name(n) for n, p in module.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in trainer.optimizers[0].param_groups]


def main() -> None:
    scenario, out, images, classes = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    rank = int(__import__("os").environ.get("RANK", "0"))
    results: dict = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        results[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
        return value

    if scenario == "mae":
        straight = timed("fsdp", lambda: pretrain(compose("pretrain", [*pretrain_args(out / "fsdp", images), *FSDP])))
        results["fsdp_steps"] = straight.global_step
        results["fsdp_groups"] = group_names(straight)
        results["lr"] = straight.optimizers[0].param_groups[0]["initial_lr"]
        stopped = timed("stopped", lambda: pretrain(compose("pretrain", [
            *pretrain_args(out / "resumed", images), *FSDP, "+callbacks.stop._target_=fsdp_worker.StopAtStep",
            "+callbacks.stop.step=3"])))
        results["stopped_steps"] = stopped.global_step
        resumed = timed("resumed", lambda: pretrain(compose("pretrain", [
            *pretrain_args(out / "resumed", images), *FSDP, "resume=auto"])))
        results["resumed_steps"] = resumed.global_step
        ddp = timed("ddp", lambda: pretrain(compose("pretrain", [*pretrain_args(out / "ddp", images), *DDP])))
        results["ddp_steps"] = ddp.global_step
        results["ddp_groups"] = group_names(ddp)
        results["ddp_lr"] = ddp.optimizers[0].param_groups[0]["initial_lr"]
    elif scenario == "others":
        for method, backbone, size, extra in [
                ("mixmae", "swin_test", 64, ["trainer.strategy.activation_checkpointing=true"]),
                ("itpn_clip", "hivit_test", 64, []),
                ("simmim", "swin_test", 64, []),  # the recipe's gradient clipping (5.0) on sharded gradients
                ("itpn", "hivit_test", 64, [])]:
            trainer = timed(method, lambda: pretrain(compose("pretrain", [
                *pretrain_args(out / method, images, f"method={method}", f"backbone={backbone}",
                               f"data.image_size={size}", "trainer.max_steps=2"), *FSDP, *extra])))
            results[f"{method}_steps"] = trainer.global_step
            if method == "itpn_clip":
                model = trainer.lightning_module.model
                results["teacher_params_sharded"] = any(type(p).__name__ == "DTensor" for p in model.teacher.parameters())
                results["teacher_in_optimizer"] = any(
                    p is q for g in trainer.optimizers[0].param_groups for p in g["params"]
                    for q in model.teacher.parameters())
        from mim_lightning.api import finetune

        pretrained = out / "fsdp_mae_ckpt"
        pretrained = Path(sys.argv[5]) if len(sys.argv) > 5 else pretrained
        trainer = timed("finetune", lambda: finetune(compose("finetune", [
            "backbone=vit_test", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "data=imagefolder", f"data.root={classes}", "data.image_size=32",
            "data.batch_size=2", "data.num_workers=0", "trainer.max_steps=2", "trainer.max_epochs=1",
            "finetune.layer_decay=0.65", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            f"pretrained={pretrained}", f"run_dir={out / 'finetune'}",
            "+callbacks.ema._target_=mim_lightning.callbacks.ema.EMA", "+callbacks.ema.decay=0.9"])))
        results["finetune_steps"] = trainer.global_step
        results["finetune_lr_scales"] = sorted({g["lr_scale"] for g in trainer.optimizers[0].param_groups})
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{scenario}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
