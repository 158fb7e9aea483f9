#!/usr/bin/env python
"""Training speed against the original VAR trainer (issue 20): FoundationVision/VAR's own trainer code and
``diffusers-var train var``, the same model, data, batch, precision and seed, one GPU; images/s, peak memory and the
loss curves.

    git clone https://github.com/FoundationVision/VAR .originals/VAR      # outside the package (git-ignored)
    python benchmarks/bench_training_original.py --original .originals/VAR --out outputs/train-vs-original
    python benchmarks/bench_training_original.py --original .originals/VAR --smoke     # CPU check of the script

The original side runs in its own process with the original repository on ``sys.path`` and builds everything the way
its ``train.py`` does: ``models.build_vae_var`` (VAR-d16: width 1,024, 16 heads, drop path 0.1 * 16 / 24,
L2-normalised attention, its own initialisation with the d16 recipe's ``alng=1e-3``), ``filter_params`` with train.py's
no-decay keys, fused AdamW (betas 0.9 / 0.95, weight decay 0.05), ``AmpOptimizer`` (fp16 with its GradScaler, or bf16;
grad clip 2),
``VARTrainer.train_step``, and the learning rate of ``lr_wd_annealing('lin0', ...)`` at every step (peak
``1e-4 * batch / 256``, warm-up over the first 2% of the steps, ``wpe=0.1`` as the d16 recipe). What it does not use is
its data pipeline (``utils/data.py`` needs torchvision and an ImageNet folder): both sides read the same images, the
package's generated shapes at 256 px (``data.type=shapes``, seed 0, 90 classes) in [-1, 1], in the same order (the
permutation accelerate's seeded sampler gives ours) with the same number of workers. TF32 and ``cudnn.benchmark``
are on for the original as its ``train.py`` sets them (our trainer leaves cuDNN's timing off); both sides wait for
the GPU at logged steps only.
``typed-argument-parser`` and ``pytz``, which the original imports for its argument parser and log time stamps, are
replaced by empty stand-ins when they are not installed (neither is used here).

The tokenizer is the released VQ-VAE configuration (ch 160, 4,096 codes, 32 channels) with random weights, made by
the original code (its convolutions initialised by PyTorch's default rule, seeded) and converted with the package's
own converter for our side, so both sides train on the same tokens. The transformer starts from the same weights on
both sides too: the original's initialisation (seeded), converted for ours and loaded through ``model.init_from``.
Both sides log the loss of steps 10, 20, ... (one step's loss each, no running mean).

Our side is ``accelerate launch -m diffusers_var.training var`` with the same model (``model.drop_path_rate`` as the
original's), batch, precision, peak learning rate and schedule (warm-up over the same steps, then
``lr_schedule=linear``, the shape of the original's lin0, to 0.1 of the peak; ours warms up from 1/warm-up steps of
the peak, the original from 0.005 of it), weight decay, grad clip, label dropout 0.1 and seed. Images/s are
measured after a quarter of the steps on both sides; peak memory is ``torch.cuda.max_memory_allocated``. Writes
``results.json`` (both curves) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PATCH_NUMS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 64: (1, 2, 3, 4)}
VAR_INIT_FILE = "var_init_original.safetensors"
NO_WEIGHT_DECAY = {  # train.py's nowd_keys
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
}  # fmt: skip


def plan(args) -> dict:
    """What both sides share."""
    resolution = 64 if args.smoke else 256
    return {
        "resolution": resolution,
        "patch_nums": PATCH_NUMS[resolution],
        "depth": args.depth or (2 if args.smoke else 16),
        "batch_size": args.batch_size or (4 if args.smoke else 96),
        "steps": args.steps or (12 if args.smoke else 300),
        "precision": "no" if args.smoke else args.precision,
        "peak_lr": 1e-4 * (args.batch_size or (4 if args.smoke else 96)) / 256,
        "weight_decay": 0.05,
        "grad_clip": 2.0,
        "seed": 0,
        "num_workers": args.num_workers if args.num_workers is not None else (0 if args.smoke else 8),
        "log_every": 2 if args.smoke else 10,
    }


def shapes_loader(p: dict):
    """The images both sides train on, in a seeded order: (pixel_values in [-1, 1], class_labels) batches."""
    import torch

    from diffusers_var.training.data import build_dataset, collate

    dataset = build_dataset(
        {"type": "shapes", "num_images": p["batch_size"] * p["steps"], "seed": p["seed"]},
        p["resolution"],
        need_labels=True,
    )
    # the order accelerate's seeded sampler gives our trainer (seed + epoch 0): one permutation of the whole set
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(p["seed"])).tolist()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=p["batch_size"],
        sampler=order,
        drop_last=True,
        num_workers=p["num_workers"],
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
    )


def _stand_in_modules() -> None:
    """Empty stand-ins for the original's argument parser and time-zone imports (unused here), when not installed.
    Its argument class also asks git for the current commit when it is defined: outside a git checkout that answer
    is "[unknown]" instead of an error."""
    check_output = subprocess.check_output

    def tolerant_check_output(command, *args, **kwargs):
        try:
            return check_output(command, *args, **kwargs)
        except subprocess.CalledProcessError:
            if isinstance(command, str) and command.startswith("git "):
                return b"[unknown]"
            raise

    subprocess.check_output = tolerant_check_output
    try:
        import tap  # noqa: F401
    except ImportError:
        sys.modules["tap"] = _stand_in("tap", Tap=object)
    try:
        import pytz  # noqa: F401
    except ImportError:
        import datetime

        sys.modules["pytz"] = _stand_in("pytz", timezone=lambda name: datetime.timezone.utc)


def _stand_in(name: str, **attributes) -> types.ModuleType:
    """A real module object (libraries imported later probe optional imports for ``__name__`` / ``__version__``:
    pandas, through transformers, looks for pytz). Version 0 is below any minimum, so they take it as absent."""
    module = types.ModuleType(name)
    module.__version__ = "0"
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def compare_curves(original: list[dict], ours: list[dict]) -> dict:
    """Our loss minus the original's at the steps both logged: the mean and the largest difference over all of
    them, and the mean over the last third (where the schedules' shapes would show)."""
    theirs = {c["step"]: c["loss"] for c in original}
    steps = sorted(c["step"] for c in ours if c["step"] in theirs)
    if not steps:
        return {}
    mine = {c["step"]: c["loss"] for c in ours}
    differences = [mine[step] - theirs[step] for step in steps]
    last_third = differences[len(differences) * 2 // 3 :]
    return {
        "steps": len(steps),
        "mean": round(statistics.mean(differences), 4),
        "largest": round(max(differences, key=abs), 4),
        "mean_last_third": round(statistics.mean(last_third), 4),
    }


def build_original_models(original: Path, device: str, seed: int, **var_kwargs):
    """The original's ``build_vae_var`` (the released VQ-VAE configuration, the VAR of ``var_kwargs``) with the
    original repository on ``sys.path``, seeded; its own initialisation for the transformer and PyTorch's default rule
    for the tokenizer, which ``build_vae_var`` leaves uninitialised (it expects a checkpoint). This process must not
    have imported the package's models first: ``build_vae_var`` switches off torch.nn's default initialisation for the
    whole process."""
    import torch

    sys.path.insert(0, str(Path(original).resolve()))
    _stand_in_modules()
    nn = torch.nn  # the classes whose default initialisation build_vae_var switches off, and their initialisers
    reset = {cls: cls.reset_parameters for cls in (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)}
    from models import build_vae_var

    kwargs = dict(
        V=4096, Cvae=32, ch=160, share_quant_resi=4, shared_aln=False, attn_l2_norm=True, flash_if_available=True,
        fused_if_available=True, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    vae, var = build_vae_var(device=device, **{**kwargs, **var_kwargs})
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            for cls, initialise in reset.items():
                if isinstance(module, cls):  # subclasses too (the quantiser's residual convs)
                    initialise(module)
                    break
    return vae, var


def run_original(original: Path, p: dict, out: Path, device: str, train: bool = True) -> dict | None:
    """The original trainer's steps (this process must not have imported the package's models first: the original's
    ``build_vae_var`` switches off torch.nn's default initialisation for the whole process). Writes the tokenizer's
    weights first; ``train=False`` stops there."""
    import torch
    from safetensors.torch import save_file

    vae, var = build_original_models(
        original, device, p["seed"], depth=p["depth"], patch_nums=p["patch_nums"], num_classes=90,
        init_adaln_gamma=1e-3,
    )  # fmt: skip
    from trainer import VARTrainer
    from utils import misc
    from utils.amp_sc import AmpOptimizer
    from utils.lr_control import filter_params, lr_wd_annealing

    misc._change_builtin_print(True)  # as train.py's set-up does: the original's print takes force= / clean=
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # its --tf32 default
    torch.backends.cudnn.benchmark = True  # as its arg_util sets up
    weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    save_file(weights, str(out / "vae_original.safetensors"))
    # the transformer as the original initialised it: our side starts from these weights (model.init_from)
    save_file({k: v.detach().contiguous().cpu() for k, v in var.state_dict().items()}, str(out / VAR_INIT_FILE))
    if not train:
        return None

    class SingleProcess(torch.nn.Module):  # train.py's stand-in for DDP on one process
        def __init__(self, module):
            super().__init__()
            self.module, self.require_backward_grad_sync = module, False

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    names, params, groups = filter_params(var, nowd_keys=NO_WEIGHT_DECAY)
    optimizer = torch.optim.AdamW(groups, lr=p["peak_lr"], weight_decay=0, betas=(0.9, 0.95), fused=device != "cpu")
    precision = {"no": 0, "fp16": 1, "bf16": 2}[p["precision"]]
    amp = AmpOptimizer(
        mixed_precision=precision, optimizer=optimizer, names=names, paras=params, grad_clip=p["grad_clip"],
        n_gradient_accumulation=1,
    )  # fmt: skip
    resos = tuple(pn * 16 for pn in p["patch_nums"])
    trainer = VARTrainer(
        device=device, patch_nums=p["patch_nums"], resos=resos, vae_local=vae, var_wo_ddp=var,
        var=SingleProcess(var), var_opt=amp, label_smooth=0.0,
    )  # fmt: skip
    metrics, quiet = misc.MetricLogger(delimiter="  "), misc.DistLogger(None, verbose=False)
    # the loss is read (one sync) at these steps only: 10, 20, ... counted from 1, the steps our trainer logs
    metrics.log_iters = set(range(p["log_every"] - 1, p["steps"], p["log_every"]))
    steps, warmup = p["steps"], max(1, round(0.02 * p["steps"]))
    curve, times = [], {}
    cuda = device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for step, batch in enumerate(shapes_loader(p)):
        images = batch["pixel_values"].to(device, non_blocking=True)
        labels = batch["class_labels"].to(device, non_blocking=True)
        lr_wd_annealing("lin0", optimizer, p["peak_lr"], p["weight_decay"], p["weight_decay"], step, warmup, steps,
                        wp0=0.005, wpe=0.1)  # fmt: skip
        trainer.train_step(
            it=step, g_it=step, stepping=True, metric_lg=metrics, tb_lg=quiet, inp_B3HW=images, label_B=labels,
            prog_si=-1, prog_wp_it=1,
        )  # fmt: skip
        if step not in metrics.log_iters and step + 1 != steps:
            continue  # timed at logged steps only, as ours: a read-back every step would cost it the overlap
        if step in metrics.log_iters:
            curve.append({"step": step + 1, "loss": metrics.meters["Lm"].value})
        if cuda:
            torch.cuda.synchronize()
        times[step + 1] = time.perf_counter() - started
        print(f"step {step + 1}: loss {curve[-1]['loss']:.4f}, {times[step + 1]:.1f} s", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"curve": curve, "times": times, "peak_gib": peak}


OURS = {  # side: (extra config overrides, accelerate's dynamo backend)
    "ours": ([], "no"),
    "ours-fp16-tokenizer": (["tokenizer_precision=fp16"], "no"),  # the frozen encoder in fp16 (TF32's mantissa)
    "ours-compiled": (["tokenizer_precision=fp16", "torch_compile=true"], "no"),  # and the model under torch.compile
    "ours-cached": (["data.cache_tokens=true"], "no"),  # the dataset's token pyramids encoded once, up front
}


def run_ours(side: str, p: dict, out: Path, device: str) -> dict:
    """``diffusers-var train var`` on the converted tokenizer, one process under accelerate."""
    import torch
    from safetensors.torch import load_file

    from diffusers_var.conversion.var import convert_vae, convert_var_transformer

    if not (out / "tokenizer").is_dir():
        tokenizer = convert_vae(load_file(str(out / "vae_original.safetensors")), p["patch_nums"])
        tokenizer.save_pretrained(out / "tokenizer")
    if not (out / "var_init").is_dir():  # the original's initial transformer, converted: both sides start equal
        initial = convert_var_transformer(load_file(str(out / VAR_INIT_FILE)), p["patch_nums"])
        initial.save_pretrained(out / "var_init")
    extra, dynamo = OURS[side]
    if device == "cpu":  # the --smoke check: fp16 convolutions crawl on a CPU (over a minute a step), bf16 does not
        extra = [item.replace("tokenizer_precision=fp16", "tokenizer_precision=bf16") for item in extra]
    run_dir = out / side
    overrides = [
        f"output_dir={run_dir}",
        f"tokenizer_path={out / 'tokenizer'}",
        f"resolution={p['resolution']}",
        f"data.num_images={p['batch_size'] * p['steps']}",
        f"data.seed={p['seed']}",
        f"batch_size={p['batch_size']}",
        f"max_steps={p['steps']}",
        f"model.depth={p['depth']}",
        f"model.embed_dim={p['depth'] * 64}",
        f"model.num_heads={p['depth']}",
        "model.mlp_ratio=4.0",
        f"model.drop_path_rate={0.1 * p['depth'] / 24}",
        f"model.init_from={out / 'var_init'}",
        f"learning_rate={p['peak_lr']}",
        f"warmup_steps={max(1, round(0.02 * p['steps']))}",
        "min_lr_ratio=0.1",
        "lr_schedule=linear",
        f"weight_decay={p['weight_decay']}",
        f"grad_clip={p['grad_clip']}",
        f"mixed_precision={p['precision']}",
        f"seed={p['seed']}",
        f"num_workers={p['num_workers']}",
        f"log_every={p['log_every']}",
        "allow_tf32=true",  # as the original (its --tf32 default)
        "ema_decay=null",
        "sample_every=0",
        "checkpoint_every=1000000",
        "resume=never",
        *extra,
    ]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", p["precision"], "--dynamo_backend", dynamo]
    command += ["-m", "diffusers_var.training", "var", "--config", str(REPO / "configs" / "var_shapes.yaml")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    }
    if device == "cpu":
        command.insert(command.index("--num_processes"), "--cpu")
    started = time.perf_counter()
    with open(out / f"{side}.log", "w") as log:
        code = subprocess.call([*command, *overrides], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise RuntimeError(f"our trainer failed ({code}); see {out / f'{side}.log'}")
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    # images_per_s is cumulative from the first step: the elapsed time at each logged step
    times = {r["step"]: r["step"] * p["batch_size"] / r["images_per_s"] for r in records}
    curve = [{"step": r["step"], "loss": r["loss"]} for r in records]
    peak = records[-1].get("peak_memory_mb", 0) / 1024 if torch.cuda.is_available() and device != "cpu" else None
    return {"curve": curve, "times": times, "peak_gib": peak, "wall_s": wall}


def steady_images_per_s(times: dict, batch: int, skip: int) -> float:
    """Images/s between the first timed step after ``skip`` and the last one."""
    times = {int(k): v for k, v in times.items()}
    first, last = min(s for s in times if s > skip), max(times)
    return (last - first) * batch / (times[last] - times[first])


def window_images_per_s(times: dict, batch: int, skip: int, windows: int = 5) -> list[float]:
    """Images/s over ``windows`` consecutive stretches of the timed steps after ``skip`` (the run's own spread: one
    process per side is all a GPU session's time allows)."""
    times = {int(k): v for k, v in times.items()}
    steps = sorted(s for s in times if s >= min(s for s in times if s > skip))
    bounds = [steps[round(i * (len(steps) - 1) / windows)] for i in range(windows + 1)]
    return [(b - a) * batch / (times[b] - times[a]) for a, b in zip(bounds, bounds[1:]) if b > a]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="a checkout of github.com/FoundationVision/VAR")
    parser.add_argument("--out", default="outputs/train-vs-original")
    parser.add_argument("--depth", type=int, default=None, help="default 16")
    parser.add_argument("--batch-size", type=int, default=None, help="per GPU; default 96 (the d16 recipe: 768 / 8)")
    parser.add_argument("--steps", type=int, default=None, help="default 300")
    parser.add_argument("--precision", choices=("fp16", "bf16"), default="fp16", help="the d16 recipe: --fp16=1")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script: 64 px, depth 2, 12 steps")
    parser.add_argument(
        "--sides",
        default="original,ours",
        help="comma-separated, run in this order: original, " + ", ".join(OURS) + " (ours-fp16-tokenizer: "
        "tokenizer_precision=fp16; ours-compiled: that and torch_compile=true; ours-cached: "
        "data.cache_tokens); sides measured before in --out stay in the table",
    )
    parser.add_argument("--side", choices=("original", "tokenizer"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    original, out = Path(args.original), Path(args.out)
    if not (original / "trainer.py").is_file() or not (original / "models" / "var.py").is_file():
        parser.error(f"--original {original} is not a checkout of FoundationVision/VAR (no trainer.py, models/var.py)")
    sides = [side for side in args.sides.split(",") if side]
    if not sides or any(side != "original" and side not in OURS for side in sides):
        parser.error(f"--sides must list some of original, {', '.join(OURS)}; got {args.sides!r}")
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        parser.error("this benchmark needs a CUDA GPU (or --smoke for a check of the script)")
    p = plan(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.side is not None:  # the child: the original trainer, or only the tokenizer it makes
        result = run_original(original, p, out, device, train=args.side == "original")
        if result is not None:
            (out / "original.json").write_text(json.dumps(result))
        return 0

    # the method is part of the plan: rows measured another way (own initialisation, cosine) are not compared
    this_plan = {**p, "patch_nums": list(p["patch_nums"]), "initial_weights": "original", "lr_schedule": "lin0"}
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    same_plan = results.get("plan") == this_plan
    if not same_plan:
        results = {}  # measured with another plan: the table starts afresh
    results.update(plan=this_plan, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    made = all((out / name).is_file() for name in ("vae_original.safetensors", VAR_INIT_FILE))
    if "original" in sides or not same_plan or not made:
        for converted in ("tokenizer", "var_init"):  # this script's conversions of the child's files: made again
            shutil.rmtree(out / converted, ignore_errors=True)
        child = [sys.executable, __file__, "--side", "original" if "original" in sides else "tokenizer", *sys.argv[1:]]
        started = time.perf_counter()
        with open(out / "original.log", "w") as log:
            code = subprocess.call(child, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        if code != 0:
            print(f"the original trainer failed ({code}); see {out / 'original.log'}", file=sys.stderr)
            return 1
        if "original" in sides:
            results["original"] = {**json.loads((out / "original.json").read_text()), "wall_s": wall}
    for side in sides:
        if side != "original":
            try:
                results[side] = run_ours(side, p, out, device)
            except RuntimeError as err:
                print(err, file=sys.stderr)
                results[side] = {"failed": str(err)}

    skip = p["steps"] // 4
    print(
        f"| trainer | batch | precision | images/s (after step {skip}) | median of 5 stretches (min-max) | peak GiB "
        "| loss at the first logged step / mid / end | whole run, s (start-up, token cache, compiling included) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for side in ["original", *OURS]:
        r = results.get(side)
        if not r or "failed" in r:
            continue
        r["images_per_s"] = steady_images_per_s(r["times"], p["batch_size"], skip)
        r["window_images_per_s"] = window_images_per_s(r["times"], p["batch_size"], skip)
        spread = r["window_images_per_s"]
        stretches = f"{statistics.median(spread):.1f} ({min(spread):.1f}-{max(spread):.1f})"
        losses = [c["loss"] for c in r["curve"]]
        marks = " / ".join(f"{x:.3f}" for x in (losses[0], losses[len(losses) // 2], statistics.mean(losses[-3:])))
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        row = f"| {side} | {p['batch_size']} | {p['precision']} | {r['images_per_s']:.1f} | {stretches} | {peak} "
        print(row + f"| {marks} | {r['wall_s']:.0f} |")
        if not all(math.isfinite(c["loss"]) for c in r["curve"]):
            print(f"{side}: a loss is not finite", file=sys.stderr)
    for side in OURS:
        if "images_per_s" in results.get(side, {}) and "images_per_s" in results.get("original", {}):
            results[side]["speedup"] = results[side]["images_per_s"] / results["original"]["images_per_s"]
            print(f"{side} / original: {results[side]['speedup']:.2f}x images/s (target >= 1.5x)")
        if "curve" in results.get(side, {}) and "curve" in results.get("original", {}):
            results[side]["loss_vs_original"] = compare_curves(results["original"]["curve"], results[side]["curve"])
            print(f"{side} loss - original loss at the same steps: {results[side]['loss_vs_original']}")
    results_file.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
