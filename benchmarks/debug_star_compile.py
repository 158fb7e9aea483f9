#!/usr/bin/env python
"""Where STAR's compiled blocks went wrong on CUDA (``fast_inference.STAR_COMPILED_CROSS_QUERY_ON_CUDA``).

On an H100, STAR-d30 at 1024 px under ``enable_fast_inference(compile_blocks=True)`` gave greedy tokens that agree
with eager float32 on 0.0% of positions, against 96.9% without ``compile_blocks``; on the CPU the compiled blocks
give the eager tokens. Found with this script in session 13 (H100, bf16): the compiled cross-attention query alone
does it (0.0% whenever it is compiled, with or without CUDA graphs; 85% with every other piece compiled; 100% in
float32), so ``enable_fast_inference`` runs that piece uncompiled on CUDA. This script runs the same greedy
generation (random weights of the real configuration, ``bench_pipelines.py``'s text features, batch 1) under
variants that each take one suspect away, and prints the agreement with eager float32 overall and per scale, and how
far the first scale's logits moved:

    python benchmarks/debug_star_compile.py                          # on the GPU: every variant
    python benchmarks/debug_star_compile.py --model star-tiny --device cpu --variants fast,compiled   # checks it
    python benchmarks/debug_star_compile.py --query-check     # the cross-attention query piece alone, and attention

Variants (a fresh pipeline each, same weights):
  fast                  enable_fast_inference() (bf16, CUDA graphs; no compiled blocks): the working reference
  compiled              + compile_blocks=True, every piece compiled on CUDA (the cross-attention query too)
  compiled-no-graphs    the same without CUDA graphs
  split-uncompiled      the split block (pieces around the KV cache and attention) with the pieces not compiled
  compiled-no-gelu      compiled, without the fused bias + GELU epilogue of the FFN
  compiled-complex-views  compiled, with STAR's RoPE tables as ``.real`` / ``.imag`` views of the complex table (as
                        in session 12; ``rope_rotary`` now passes contiguous real tables)
  compiled-float32      compiled in float32 with CUDA graphs (close to 1.0 if the compiled code is right: inductor
                        reorders reductions, which can flip a near-tie of the random weights)
  compiled-only-ffn     only the FFN piece compiled (the others run their uncompiled code)
  compiled-only-self-attention   only the self-attention pieces compiled
  compiled-no-cross     every piece compiled but the cross-attention's two
  compiled-only-cross   only the cross-attention's two pieces compiled
  compiled-no-cross-query / compiled-no-cross-output   every piece compiled but that one
  compiled-as-shipped   the blocks compiled as enable_fast_inference does on CUDA (cross-attention query uncompiled)
  compiled-watch-query  every piece compiled, no CUDA graphs, each compiled query call also checked against the plain
                        query on the same rows inside the generation (how far, which block)
The default order puts the most telling first; ``--variants`` picks (``gpu_session.sh``: ``STAR_DEBUG_VARIANTS``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipelines as bench  # noqa: E402

from diffusers_var.models import star_transformer  # noqa: E402
from diffusers_var.models.blocks import Rotary2D  # noqa: E402
from diffusers_var.pipelines import fast_inference  # noqa: E402

VARIANTS = (
    "compiled-as-shipped",
    "compiled-only-cross",
    "compiled-no-cross-query",
    "compiled-no-cross-output",
    "compiled",
    "compiled-complex-views",
    "fast",
    "compiled-no-graphs",
    "compiled-float32",
    "split-uncompiled",
    "compiled-only-ffn",
    "compiled-only-self-attention",
    "compiled-no-cross",
    "compiled-no-gelu",
    "compiled-watch-query",
)
PIECES = {  # the compiled pieces of a STAR block (fast_inference.compile_star_blocks_)
    "ffn": ("compiled_ffn_residual",),
    "self-attention": (
        "compiled_attention_inputs",
        "compiled_attention_inputs_into_cache",
        "compiled_attention_residual",
    ),
    "cross": ("compiled_cross_attention_query", "compiled_cross_attention_output"),
}
COMPILED_PIECES = {  # variant -> the pieces that stay compiled (default: all)
    "compiled-only-ffn": PIECES["ffn"],
    "compiled-only-self-attention": PIECES["self-attention"],
    "compiled-no-cross": PIECES["ffn"] + PIECES["self-attention"],
    "compiled-only-cross": PIECES["cross"],
    "compiled-no-cross-query": PIECES["ffn"] + PIECES["self-attention"] + PIECES["cross"][1:],
    "compiled-no-cross-output": PIECES["ffn"] + PIECES["self-attention"] + PIECES["cross"][:1],
}


@contextlib.contextmanager
def patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def complex_views(table_LD2: torch.Tensor) -> Rotary2D:
    """The tables as they were when the compiled blocks went wrong on an H100: views of the complex table."""
    return Rotary2D(table_LD2.real, table_LD2.imag)


def uncompile_pieces(transformer, keep: tuple[str, ...]) -> None:
    """Every compiled piece of the main blocks not in ``keep`` back to its plain (bound) function."""
    for block in transformer.blocks:
        for name in sum(PIECES.values(), ()):
            piece = getattr(block, name, None)
            if piece is not None and name not in keep:
                setattr(block, name, piece.below._torchdynamo_orig_callable)


def greedy(pipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of every scale (1, L) and the first scale's model logits."""
    seen, logits = [], []

    def keep(p, si, scale, tensors):
        seen.append(tensors["tokens"].clone())
        if si == 0:
            logits.append(tensors["model_logits"].float().clone())
        return {}

    bench.generate_star(
        pipe,
        1,
        device,
        top_k=1,
        top_p=0.0,
        output_type="latent",
        callback_on_step_end_tensor_inputs=["tokens", "model_logits"],
        callback_on_step_end=keep,
    )
    return torch.cat(seen, dim=1), logits[0]


def run_variant(model: str, variant: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = bench.build_star(model, device)
    dtype = torch.float32 if variant == "compiled-float32" else torch.bfloat16
    compiled = variant != "fast"
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(fast_inference, "STAR_COMPILED_BLOCKS_ON_CUDA", True))
        if variant != "compiled-as-shipped":  # every piece may run compiled (the cross-attention query too)
            stack.enter_context(patched(fast_inference, "STAR_COMPILED_CROSS_QUERY_ON_CUDA", True))
        if variant == "split-uncompiled":  # the pieces stay plain Python: torch.compile returns its argument
            stack.enter_context(patched(torch, "compile", lambda fn, *a, **k: fn))
        if variant == "compiled-complex-views":
            stack.enter_context(patched(star_transformer, "rope_rotary", complex_views))
        graphs = variant not in ("compiled-no-graphs", "compiled-watch-query")
        pipe.enable_fast_inference(dtype=dtype, cuda_graphs=graphs, compile_blocks=compiled)
        if variant == "compiled-no-gelu":
            fast_inference.fuse_ffn_gelu_(pipe.transformer, False)
        if variant in COMPILED_PIECES:
            uncompile_pieces(pipe.transformer, keep=COMPILED_PIECES[variant])
        watched = watch_query_in_place(pipe.transformer) if variant == "compiled-watch-query" else None
        result = greedy(pipe, device)
        if watched:
            distances = torch.tensor([distance for _, _, distance in watched])
            worst = max(watched, key=lambda call: call[2])
            print(
                f"  compiled query against the plain one on the same rows, {len(watched)} calls: median "
                f"{distances.median().item():.2e}, largest {worst[2]:.2e} (block {worst[0]}, {worst[1]} rows); "
                f"above 1e-2: {int((distances > 1e-2).sum())}",
                flush=True,
            )
        return result


def query_check(model: str, device, dtype: torch.dtype) -> None:
    """The cross-attention query piece alone, on one block of the model's width with random weights: for the rows
    ``x[:1]`` of a (2, L, C) stream (the row-0 quirk) and for the whole stream, at every scale's L, how far the
    compiled query is from the plain one, their strides, and how far the attention over random text keys moves with
    each (a kernel that reads the compiled query's layout differently shows there, not in the query)."""
    pipe = bench.build_star(model, "cpu")
    block = pipe.transformer.blocks[0].to(device, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    copies = fast_inference._row_regime_copies(fast_inference._star_cross_attention_query)
    compiled = fast_inference._dynamic_rows(*(torch.compile(types.MethodType(c, block)) for c in copies))
    cfg = pipe.transformer.config
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 77, heads, head_dim, generator=g), dim=-1).to(device, dtype)
    v = torch.randn(1, 77, heads, head_dim, generator=g).to(device, dtype)
    mask = (torch.arange(77) < 16)[None].to(device)

    def moved(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    with torch.no_grad():
        for side in cfg.patch_nums:
            x = torch.randn(2, side * side, cfg.embed_dim, generator=g).to(device, dtype)
            for rows_name, rows in (("x[:1]", x[:1]), ("x", x)):
                plain, fused = fast_inference._star_cross_attention_query(block, rows), compiled(rows)
                rows_k, rows_v, rows_mask = (t.expand(rows.shape[0], *t.shape[1:]) for t in (k, v, mask))
                queries = (plain, fused, fused.contiguous())
                attended = [block.cross_attn.attend(q, rows_k, rows_v, rows_mask).float() for q in queries]
                print(
                    f"L={side * side:5d} rows {rows_name:5s}: query moved {moved(fused, plain):.2e}, attention moved "
                    f"{moved(attended[1], attended[0]):.2e} (compiled made contiguous: "
                    f"{moved(attended[2], attended[0]):.2e}); strides plain {tuple(plain.stride())}, compiled "
                    f"{tuple(fused.stride())}",
                    flush=True,
                )


def watch_query_in_place(transformer) -> list[tuple[int, int, float]]:
    """Wrap every main block's compiled cross-attention query so that each call also runs the plain query on the
    same rows: returns the list it fills with (block, rows, relative distance) per call."""
    seen = []
    for index, block in enumerate(transformer.blocks):
        compiled = getattr(block, "compiled_cross_attention_query", None)
        if compiled is None:
            continue

        def watched(rows, compiled=compiled, block=block, index=index):
            fused = compiled(rows)
            plain = fast_inference._star_cross_attention_query(block, rows)
            distance = ((fused.float() - plain.float()).norm() / plain.float().norm()).item()
            seen.append((index, rows.shape[0] * rows.shape[1], distance))
            return fused

        block.compiled_cross_attention_query = watched
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="star-d30", choices=("star-d30", "star-tiny"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument(
        "--query-check",
        action="store_true",
        help="only the cross-attention query piece of one block, compiled against plain, in bf16 and float32",
    )
    args = parser.parse_args()
    if args.query_check:
        for dtype in (torch.bfloat16, torch.float32):
            print(f"query check, {dtype}:", flush=True)
            query_check(args.model, torch.device(args.device), dtype)
        return 0
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    reference = bench.build_star(args.model, device)
    patch_nums = reference.transformer.config.patch_nums
    with torch.no_grad():
        reference_tokens, reference_logits = greedy(reference, device)  # eager float32
    del reference  # the variants build their own
    starts = [0]
    for side in patch_nums:
        starts.append(starts[-1] + side * side)
    for variant in variants:
        started = time.perf_counter()
        try:
            tokens, logits = run_variant(args.model, variant, device)
        except Exception as error:  # a diagnosis: report and go on with the next variant
            print(f"{variant:22s} failed: {type(error).__name__}: {error}", flush=True)
            continue
        same = (tokens == reference_tokens).float()
        per_scale = " ".join(f"{same[:, a:b].mean().item():.2f}" for a, b in zip(starts, starts[1:]))
        moved = (logits - reference_logits).norm() / reference_logits.norm()
        half = logits.shape[0] // 2  # conditional rows first: what guidance amplifies is their difference
        difference, reference_difference = (t[:half] - t[half:] for t in (logits, reference_logits))
        difference_moved = (difference - reference_difference).norm() / reference_difference.norm()
        print(
            f"{variant:22s} agreement {same.mean().item():.4f}; first scale's logits moved {moved.item():.2e} of "
            f"their norm (conditional - unconditional: {difference_moved.item():.2e}), finite "
            f"{bool(torch.isfinite(logits).all())}; per scale: {per_scale} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
