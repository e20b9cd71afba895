"""The checks only a GPU can run, in under 8 minutes on one GPU; writes a markdown report.

    python scripts/gpu_check.py                       # outputs/gpu_check/report.md
    python scripts/gpu_check.py --out /tmp/check --budget 420

Run it once on every new machine (driver, CUDA, torch and NCCL versions). Without a CUDA device it prints
"no GPU", writes a report saying so and exits 0. Each part runs in its own process (an out-of-memory error or a
crash in one check does not end the others) and the whole run keeps to ``--budget`` seconds: a check that would
start after it is reported as skipped.

1. **bf16 fits**: every pretraining method (MAE ViT-B/16, SimMIM Swin-B and ViT-B, MixMAE Swin-B/W14, iTPN-B
   pixel and CLIP with a random teacher) for a few steps on the demo photos at its recipe's size, under DDP
   (``trainer=ddp trainer.devices=1``) and FSDP2 (``trainer=fsdp trainer.devices=1``: bf16 parameters, fp32
   reductions), plus finetuning under FSDP2; the loss must be finite. ``compile=true`` for MAE under both.
   A sharded checkpoint of the FSDP2 MAE fit is exported and must equal the export of the DDP fit to bf16
   tolerance (the two runs differ by bf16 all-gathers, so not bitwise as on the CPU in fp32).
2. **Benchmark CUDA paths** (``scripts/benchmark.py --device cuda``): fused AdamW is selected, peak memory and
   MFU are reported.
3. **GPU table of docs/benchmarks.md**: img/s, MFU and peak memory for MAE ViT-B/16 and ViT-L/16 (224),
   SimMIM Swin-B (192), MixMAE Swin-B/W14 (224) and iTPN-B (224) at the paper's batch per GPU, halved until it fits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: (label, overrides) of the bf16 fits.
FITS = [
    ("MAE ViT-B/16", ["method=mae", "backbone=vit_b"]),
    ("SimMIM Swin-B 192", ["method=simmim", "backbone=swin_b"]),
    ("SimMIM ViT-B/16", ["method=simmim", "backbone=vit_b"]),
    ("MixMAE Swin-B/W14", ["method=mixmae", "backbone=swin_b"]),
    ("iTPN-B pixel", ["method=itpn", "backbone=hivit_b"]),
    ("iTPN-B CLIP (random teacher)", ["method=itpn_clip", "backbone=hivit_b"]),
]
STRATEGIES = {"DDP": ["trainer=ddp", "trainer.devices=1"], "FSDP2": ["trainer=fsdp", "trainer.devices=1"]}
#: (label, overrides, paper batch per GPU) of the benchmark table.
TABLE = [
    ("MAE ViT-B/16", ["method=mae", "backbone=vit_b", "data.image_size=224"], 64),    # 4096 on 64 GPUs
    ("MAE ViT-L/16", ["method=mae", "backbone=vit_l", "data.image_size=224"], 64),
    ("SimMIM Swin-B 192", ["method=simmim", "backbone=swin_b", "data.image_size=192"], 128),  # 2048 on 16
    ("MixMAE Swin-B/W14", ["method=mixmae", "backbone=swin_b", "data.image_size=224"], 128),  # 1024 on 8
    ("iTPN-B", ["method=itpn", "backbone=hivit_b", "data.image_size=224"], 128),     # 4096 on 32
]
FIT_STEPS = 4
FIT_BATCH = 16

FIT_CODE = r"""
import json, math, sys, torch
from mim_lightning import compose, pretrain
from mim_lightning.api import finetune
kind, out, *overrides = sys.argv[1:]
if kind == "finetune":
    trainer = finetune(compose("finetune", overrides))
    loss = trainer.callback_metrics.get("finetune/train_loss")
else:
    trainer = pretrain(compose("pretrain", overrides))
    loss = trainer.callback_metrics.get("train/loss")
opt = trainer.optimizers[0]
result = {"steps": trainer.global_step, "loss": None if loss is None else float(loss),
          "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
          "fused_adamw": bool(opt.defaults.get("fused")), "strategy": type(trainer.strategy).__name__}
result["finite"] = result["loss"] is not None and math.isfinite(result["loss"])
open(out, "w").write(json.dumps(result))
"""


def run(command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, timeout),
                              env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        return 124, f"timed out after {error.timeout:.0f} s"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:200].replace("|", "/")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def fit(label: str, kind: str, overrides: list[str], out: Path, budget: Budget, timeout: float = 120) -> dict:
    if budget.left() < 20:
        return {"label": label, "status": "skipped (time budget)"}
    result_file = out / f"fit_{len(list(out.glob('fit_*.json')))}.json"
    code, text = run([sys.executable, "-c", FIT_CODE, kind, str(result_file), *overrides],
                     min(timeout, budget.left()), env={"PYTHONPATH": str(REPO)})
    if code != 0 or not result_file.is_file():
        return {"label": label, "status": f"FAILED (exit {code}): {last_line(text)}"}
    result = json.loads(result_file.read_text())
    ok = result["finite"] and result["steps"] > 0
    return {"label": label, "status": "ok" if ok else "FAILED: non-finite loss", **result}


def fits(out: Path, budget: Budget) -> list[dict]:
    rows = []
    common = ["data=demo", f"data.batch_size={FIT_BATCH}", "data.num_workers=2", f"trainer.max_steps={FIT_STEPS}",
              "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "~callbacks.reconstructions",
              "trainer.precision=bf16-mixed"]
    for label, overrides in FITS:
        for name, strategy in STRATEGIES.items():
            run_dir = out / "runs" / f"{label.split()[0]}_{len(rows)}_{name}"
            rows.append(fit(f"{label}, {name}", "pretrain", [*overrides, *common, *strategy, f"run_dir={run_dir}"],
                            out, budget))
            if label.startswith("MAE"):
                rows[-1]["run_dir"] = str(run_dir)
    for name, strategy in STRATEGIES.items():
        rows.append(fit(f"MAE ViT-B/16 compile=true, {name}", "pretrain",
                        ["method=mae", "backbone=vit_b", *common, *strategy, "compile=true",
                         f"run_dir={out / 'runs' / ('compile_' + name)}"], out, budget, timeout=240))
    mae_fsdp = next((r for r in rows if r["label"] == "MAE ViT-B/16, FSDP2"), {})
    if mae_fsdp.get("status") == "ok":
        rows.append(fit("finetune ViT-B/16 from the FSDP2 folder (layer decay, EMA), FSDP2", "finetune",
                        ["method=mae", "backbone=vit_b", "data=demo", "data.batch_size=16", "trainer.max_steps=4",
                         "trainer.max_epochs=1", "trainer=fsdp", "trainer.devices=1", "trainer.enable_progress_bar=false",
                         f"pretrained={mae_fsdp['run_dir']}/checkpoints/last.ckpt",
                         "+callbacks.ema._target_=mim_lightning.callbacks.ema.EMA", "+callbacks.ema.decay=0.99",
                         f"run_dir={out / 'runs' / 'finetune_fsdp'}"], out, budget))
    return rows


def export_check(rows: list[dict]) -> str:
    """Export the MAE encoder of the DDP and FSDP2 fits and compare them."""
    dirs = {r["label"].rsplit(", ", 1)[1]: r.get("run_dir") for r in rows if r["label"].startswith("MAE ViT-B/16, ")}
    if not all(dirs.get(k) for k in ("DDP", "FSDP2")):
        return "skipped (no MAE fits)"
    try:
        import torch
        from safetensors.torch import load_file

        from mim_lightning.export import export

        files = {}
        for name, run_dir in dirs.items():
            files[name] = Path(run_dir) / "encoder.safetensors"
            export(Path(run_dir) / "checkpoints" / "last.ckpt", files[name])
        a, b = load_file(str(files["DDP"])), load_file(str(files["FSDP2"]))
        worst = max(((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12)).item() for k in a)
        same = sorted(a) == sorted(b)
        return f"{'ok' if same and worst < 1e-2 else 'FAILED'}: same keys {same}, max relative difference {worst:.2e}"
    except Exception as error:  # noqa: BLE001 - reported, the other checks go on
        return f"FAILED: {type(error).__name__}: {error}"


def benchmark_table(out: Path, budget: Budget) -> list[dict]:
    rows = []
    for label, overrides, batch in TABLE:
        while True:
            if budget.left() < 30:
                rows.append({"label": label, "status": "skipped (time budget)"})
                break
            folder = out / "bench" / f"{len(rows)}_{batch}"
            code, text = run([sys.executable, "scripts/benchmark.py", *overrides, f"data.batch_size={batch}",
                              "--device", "cuda", "--precision", "bf16", "--steps", "10", "--warmup", "3",
                              "--no-baselines", "--no-loader", "--out", str(folder)], min(150, budget.left()))
            records = folder / "benchmarks.jsonl"
            if code == 0 and records.is_file() and records.read_text().strip():
                record = json.loads(records.read_text().strip().splitlines()[-1])
                rows.append({"label": label, "status": "ok", "batch": batch, "record": record})
                break
            if "out of memory" in text.lower() and batch > 8:
                batch //= 2
                continue
            rows.append({"label": label, "status": f"FAILED (exit {code}): {last_line(text)}", "batch": batch})
            break
    return rows


def pick(record: dict, name: str):
    value = record.get(name)
    return f"{value:.3g}" if isinstance(value, float) else value


def report(out: Path, fit_rows: list[dict], export_line: str, bench_rows: list[dict], device: str, seconds: float) -> str:
    lines = ["# GPU check", "", f"Device: {device}. Took {seconds:.0f} s.", "",
             f"## bf16 fits ({FIT_STEPS} steps, batch {FIT_BATCH}, demo photos, 1 GPU)", "",
             "| run | status | strategy | loss | peak GiB | fused AdamW |", "|---|---|---|---|---|---|"]
    for r in fit_rows:
        loss = f"{r['loss']:.4f}" if isinstance(r.get("loss"), float) else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['label']} | {r['status']} | {r.get('strategy', '-')} | {loss} | {peak} | "
                     f"{r.get('fused_adamw', '-')} |")
    lines += ["", f"Export of the FSDP2 sharded folder vs the DDP file (MAE ViT-B/16): {export_line}", "",
              "## Benchmark (scripts/benchmark.py --device cuda --precision bf16)", "",
              "| config | status | batch | img/s | MFU | peak memory MiB |", "|---|---|---|---|---|---|"]
    for r in bench_rows:
        rec = r.get("record") or {}
        lines.append(f"| {r['label']} | {r['status']} | {r.get('batch', '-')} | "
                     f"{pick(rec, 'images_per_sec') or '-'} | {pick(rec, 'mfu') or '-'} | "
                     f"{pick(rec, 'peak_mem_mb') or '-'} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for report.md and the runs")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all checks (default 450)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        message = "no GPU: scripts/gpu_check.py needs a CUDA device; nothing was checked"
        (out / "report.md").write_text(f"# GPU check\n\n{message}.\n")
        print(message)
        return 0
    started = time.monotonic()
    budget = Budget(args.budget)
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    fit_rows = fits(out, budget)
    export_line = export_check(fit_rows)
    bench_rows = benchmark_table(out, budget)
    print(report(out, fit_rows, export_line, bench_rows, device, time.monotonic() - started))
    failed = [r for r in fit_rows + bench_rows if r["status"].startswith("FAILED")] + \
        ([export_line] if export_line.startswith("FAILED") else [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
