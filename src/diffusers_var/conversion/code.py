"""CoDe checkpoints (czg1225/CoDe) -> a diffusers :class:`VARCoDePipeline`.

CoDe's fine-tuned ``drafter_N.pth`` / ``refiner_N.pth`` are plain VAR state dicts (the key layout of ``var_d30.pth`` /
``var_d16.pth``), and its training-free mode uses the VAR releases themselves, so both roles go through the VAR
converter: every hyper-parameter is inferred from the tensors, the scale schedule from ``lvl_1L`` (else the token
count, else ``patch_nums``), and the two models must agree with each other and with the shared VQ-VAE.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

from .common import (
    ConversionError,
    ConversionWarning,
    atomic_save_pipeline,
    cast_for_output,
    check_dtype,
    check_inputs,
    check_output_dir,
    check_switch,
    reading_checkpoint,
)
from .var import _load_vae, _load_var, check_arguments, convert_vae, convert_var_transformer


def _for_role(err: ConversionError, role: str) -> ConversionError:
    """A VAR conversion error reworded for CoDe's ``role``: its argument and flag names carry the role."""
    message = str(err).replace("`transformer`", f"`{role}`")
    if role == "refiner":  # a weight the message names: the pipeline's refiner is its own component
        message = message.replace("`transformer.", "`refiner.")
    for name in ("depth", "num_heads"):
        message = message.replace(f"`{name}`", f"`{role}_{name}`")
        message = message.replace(f"--{name.replace('_', '-')}", f"--{role}-{name.replace('_', '-')}")
    return ConversionError(message)


def _convert_role(path, patch_nums, role: str, depth: int | None = None, num_heads: int | None = None):
    """One of CoDe's two VAR checkpoints, converted; errors name its role (``drafter`` / ``refiner``)."""
    try:
        state_dict = _load_var(path)
        with reading_checkpoint("transformer", path):
            return convert_var_transformer(state_dict, patch_nums, depth, num_heads)
    except ConversionError as err:
        raise _for_role(err, role) from None


def _size(model) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), model.config.depth


def swapped_roles_warning(drafter, refiner) -> str | None:
    """The warning for a drafter smaller than its refiner (fewer parameters, then fewer blocks): CoDe drafts the
    early scales with the large model and refines with the small one. Any pair converts (training-free CoDe takes
    two checkpoints), so a swap is only reported."""
    (drafter_params, drafter_depth), (refiner_params, refiner_depth) = _size(drafter), _size(refiner)
    if (drafter_params, drafter_depth) >= (refiner_params, refiner_depth):
        return None
    return (
        f"the drafter is the smaller model (depth {drafter_depth}, {drafter_params:,} parameters; the refiner depth "
        f"{refiner_depth}, {refiner_params:,}): CoDe drafts with the large one and refines with the small one; did "
        "you swap --drafter and --refiner?"
    )


def convert_code_checkpoint(
    vae_path: str | os.PathLike,
    drafter_path: str | os.PathLike,
    refiner_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    draft_steps: int | None = None,
    patch_nums: Sequence[int] | None = None,
    quant_resi: float = 0.5,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    drafter_depth: int | None = None,
    drafter_num_heads: int | None = None,
    refiner_depth: int | None = None,
    refiner_num_heads: int | None = None,
    using_znorm: bool = False,
):
    """Convert an original VQ-VAE and a drafter / refiner pair of VAR checkpoints into a :class:`VARCoDePipeline`.

    ``draft_steps`` (the N the pair was fine-tuned for; default ``num_scales - 2``) is stored with the pipeline.
    ``drafter_depth`` / ``refiner_depth``, ``drafter_num_heads`` / ``refiner_num_heads`` and ``using_znorm`` are
    :func:`convert_var_checkpoint`'s ``depth``, ``num_heads`` and ``using_znorm`` for each role (heads for a model
    trained with ``attn_l2_norm=False``, which its tensors do not record; codes by cosine similarity). When
    ``output_dir`` is given the pipeline is written there atomically (safetensors only). Returns the pipeline. Errors
    (:class:`ConversionError`, a ``ValueError``) name the argument at fault; a drafter smaller than the refiner (the
    roles swapped?) is a :class:`ConversionWarning`."""
    from ..pipelines.pipeline_var import VARCoDePipeline

    for role, depth, num_heads in (
        ("drafter", drafter_depth, drafter_num_heads),
        ("refiner", refiner_depth, refiner_num_heads),
    ):
        try:
            check_arguments(patch_nums, quant_resi, depth, num_heads)
        except ConversionError as err:
            raise _for_role(err, role) from None
    if draft_steps is not None and (
        isinstance(draft_steps, bool) or not isinstance(draft_steps, int) or draft_steps < 1
    ):
        raise ConversionError(f"`draft_steps` must be a whole number >= 1 (and < num_scales), got {draft_steps!r}.")
    check_switch(using_znorm, "using_znorm")
    dtype = check_dtype(dtype)
    if output_dir is not None:  # before reading the checkpoints
        check_output_dir(output_dir, overwrite)
    check_inputs(files={"drafter": drafter_path, "refiner": refiner_path, "vae": vae_path})  # all before any is read
    drafter = _convert_role(drafter_path, patch_nums, "drafter", drafter_depth, drafter_num_heads)
    refiner = _convert_role(refiner_path, patch_nums, "refiner", refiner_depth, refiner_num_heads)
    swapped = swapped_roles_warning(drafter, refiner)
    if swapped:
        warnings.warn(swapped, ConversionWarning, stacklevel=2)
    vae_sd = _load_vae(vae_path)
    with reading_checkpoint("vae", vae_path):
        vqvae = convert_vae(vae_sd, drafter.config.patch_nums, quant_resi, using_znorm)
    for name, model in (("drafter", drafter), ("refiner", refiner)):
        if (
            vqvae.config.vocab_size != model.config.vocab_size
            or vqvae.config.z_channels != model.config.latent_channels
        ):
            raise ConversionError(
                f"`vae` (vocab {vqvae.config.vocab_size}, z {vqvae.config.z_channels}) does not belong to `{name}` "
                f"(vocab {model.config.vocab_size}, z {model.config.latent_channels})."
            )
    for key in ("patch_nums", "num_classes"):
        if str(drafter.config[key]) != str(refiner.config[key]):
            raise ConversionError(
                f"`refiner` has {key}={refiner.config[key]}, the drafter {drafter.config[key]}: CoDe's two "
                "models must share the scale schedule and the class set."
            )
    num_scales = len(drafter.config.patch_nums)
    if draft_steps is not None and (not isinstance(draft_steps, int) or not 1 <= draft_steps <= num_scales - 1):
        raise ConversionError(
            f"`draft_steps` must be in [1, {num_scales - 1}] for {num_scales} scales, got {draft_steps!r}."
        )
    cast_for_output(dtype, transformer=drafter, refiner=refiner, vqvae=vqvae)
    pipe = VARCoDePipeline(transformer=drafter, refiner=refiner, vqvae=vqvae, draft_steps=draft_steps)
    if output_dir is not None:
        atomic_save_pipeline(pipe, output_dir, overwrite=overwrite)
    return pipe
