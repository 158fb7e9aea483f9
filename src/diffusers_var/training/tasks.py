"""What is trained: the model, its data, its loss, its export. One class per task."""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..conversion.common import atomic_save_pipeline
from ..file_utils import write_atomic
from ..models.bitwise_vae import BitwiseMultiScaleVAE
from ..models.dynamic_resolution import schedule_for_pixels, supported_pixel_sizes
from ..models.infinity_transformer import InfinityTransformer2DModel, infinity_ffn_dim
from ..models.loading import config_problem
from ..models.multiscale_vq import MultiScaleVQModel
from ..models.star_transformer import STARTransformer2DModel
from ..models.var_transformer import VARTransformer2DModel
from ..scalars import is_number
from . import lora
from .data import HFDataset, build_dataset, collate
from .text_encoders import load_text_encoder, text_hidden_size


def _save_grid(images_01: torch.Tensor, path: Path, columns: int = 8) -> None:
    array = (images_01.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    rows = [np.concatenate(list(array[i : i + columns]), axis=1) for i in range(0, len(array), columns)]
    rows = [np.pad(r, ((0, 0), (0, rows[0].shape[1] - r.shape[1]), (0, 0))) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = PIL.Image.fromarray(np.concatenate(rows, axis=0))
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))  # a kill mid-write leaves no half a PNG


class _AtomicFolder:
    """``save_pretrained``-able wrapper so a single model is exported atomically like a pipeline."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, path, safe_serialization=True):
        self.model.save_pretrained(path, safe_serialization=safe_serialization)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _frozen(model, device):
    return model.to(device).eval().requires_grad_(False)


# what a model constructor raises for arguments it cannot build (a ValueError naming the argument, or torch's own
# errors, e.g. "Trying to create tensor with negative dimension")
CONSTRUCTOR_ERRORS = (ValueError, TypeError, RuntimeError, IndexError, ArithmeticError, AssertionError)
# errors of ``from_pretrained`` on a folder that is not the expected model (or a Hub id that cannot be fetched)
LOAD_ERRORS = (OSError, ValueError, TypeError, RuntimeError, KeyError)


# integer constructor arguments that are sizes or counts (>= 1); other integer arguments may be 0
# (``share_quant_resi``: one Phi per scale, ``num_res_blocks``, ``num_legacy_classes``, ...)
def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def _construct(model_class, model_args: dict):
    """``model_class(**model_args)``; a constructor error becomes a ``ValueError`` naming the ``model`` section (and
    the key, where the model's message names its argument)."""
    try:
        return model_class(**model_args)
    except CONSTRUCTOR_ERRORS as err:
        params = model_parameters(model_class)
        message = re.sub(r"`(\w+)`", lambda m: f"`model.{m[1]}`" if m[1] in params else m[0], _one_line(err))
        raise ValueError(
            f"`model`: cannot build a {model_class.__name__} from the `model` section ({message})."
        ) from None


def _original_drop_path(model_args: dict, model_class: type) -> None:
    """``model.drop_path_rate`` of a new VAR / STAR model, unless the config gives it: the original trainers' 0.1 x
    depth / 24 (the models' own default, 0, is what a converted checkpoint's inference needs)."""
    depth = model_args.get("depth", model_parameters(model_class)["depth"].default)
    if is_number(depth):  # (a wrong type is the model's ValueError, naming the key)
        model_args.setdefault("drop_path_rate", 0.1 * depth / 24)


def _original_pool_heads(model_args: dict, text_dim: int) -> None:
    """``model.pool_num_heads`` of a new Infinity model, unless the config gives it: the original's text pooling
    heads of 128 features, of 64 in models wider than 4,096 (infinity_20b)."""
    width = model_args.get("embed_dim", model_parameters(InfinityTransformer2DModel)["embed_dim"].default)
    if is_number(width):  # (a wrong type is the model's ValueError, naming the key)
        model_args.setdefault("pool_num_heads", max(1, text_dim // (64 if width > 4096 else 128)))


def _new(model_class, model_args: dict, **init):
    """A freshly initialised transformer (``init_weights(**init)``)."""
    model = _construct(model_class, model_args)
    model.init_weights(**init)
    return model


def _load_pretrained(model_class, path: str, key: str, **kwargs):
    """``model_class.from_pretrained(path)``; a folder that does not hold one is a ``ValueError`` naming ``key``."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():  # another model's folder would load with missing weights left on the meta device
        try:
            class_name = json.loads(config_file.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"`{key}`: cannot read {str(config_file)!r} ({_one_line(err)}).") from None
        if class_name != model_class.__name__:
            raise ValueError(f"`{key}`: {str(path)!r} holds a {class_name}, not a {model_class.__name__}.")
    try:
        return model_class.from_pretrained(path, **kwargs)
    except LOAD_ERRORS as err:
        raise ValueError(
            f"`{key}`: cannot load a {model_class.__name__} from {str(path)!r} ({_one_line(err)})."
        ) from None


def model_parameters(model_class) -> dict[str, inspect.Parameter]:
    """The constructor arguments of a model class (its diffusers config keys)."""
    return {
        name: parameter
        for name, parameter in inspect.signature(model_class.__init__).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def _check_model_value(key: str, value, parameter) -> None:
    """The checks of the model's own config arguments (their annotations), named as `model.*` keys, before
    anything is built."""
    problem = config_problem(key, str(parameter.annotation), value)
    if problem:
        raise ValueError(f"`model.{key}` must be {problem}, got {value!r}.")


def check_model_section(config) -> dict:
    """Validate the ``model`` section for ``config.task`` before anything is built: every key is a constructor
    argument of the trained model class (or one of the task's initialisation keys) with a value of the right kind.
    A ``ValueError`` names the key and lists the accepted ones."""
    task_class = TASKS[config.task]
    model_class = task_class.model_class
    if config.lora is not None:  # the transformer of lora.base is trained as it is
        if config.model:
            raise ValueError(
                f"`model`: a LoRA run adapts the transformer of `lora.base` as it is; remove the `model` keys "
                f"{sorted(config.model)}."
            )
        return config.model
    params = model_parameters(model_class)
    set_by_trainer = task_class.model_keys_set_by_trainer
    init_keys = task_class.model_init_keys
    refused = task_class.model_keys_refused
    accepted = sorted((set(params) - set(set_by_trainer) - set(refused)) | set(init_keys))
    for key, value in config.model.items():
        if key in refused:
            raise ValueError(
                f"`model.{key}`: task {config.task} {refused[key]}; remove it. Accepted `model` "
                f"keys for task {config.task}: {', '.join(accepted)}."
            )
        if key in set_by_trainer:
            raise ValueError(
                f"`model.{key}` is set by the trainer (from {set_by_trainer[key]}); remove it. Accepted `model` "
                f"keys for task {config.task}: {', '.join(accepted)}."
            )
        if key not in accepted:
            raise ValueError(
                f"unknown key `model.{key}` for task {config.task} ({model_class.__name__}); accepted `model` "
                f"keys: {', '.join(accepted)}."
            )
        if key in init_keys:
            kind = init_keys[key]
            if kind == "number" and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ):
                raise ValueError(f"`model.{key}` must be a number, got {value!r}.")
            if (
                kind == "indices"
                and value is not None
                and not (
                    isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                )
            ):
                raise ValueError(f"`model.{key}` must be a list of block indices, e.g. [0, 5], got {value!r}.")
            if kind == "path" and value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"`model.{key}` must be a model folder path, got {value!r}.")
        else:
            _check_model_value(key, value, params[key])
        fixed = getattr(task_class, "model_keys_fixed", {})
        if key in fixed and value != fixed[key]:
            raise ValueError(f"`model.{key}` must be {fixed[key]} (the training images are RGB), got {value!r}.")
    # the blocks to copy from the init_from model: without one they were ignored without a word
    if config.model.get("init_blocks") is not None and config.model.get("init_from") is None:
        raise ValueError(
            "`model.init_blocks` picks the blocks copied from `model.init_from`, which is not set; set "
            "model.init_from or remove model.init_blocks."
        )
    return config.model


def has_unused_parameters(config) -> bool:
    """Whether the model trained by ``config`` has parameters that no step uses: a tokenizer with more shared Phi convs
    than its scales pick (``patch_nums`` [1, 2, 4] with ``share_quant_resi`` 4 leaves one unused). DDP must then look
    for them at every step, or its second step fails waiting for their gradients."""
    if config.task != "tokenizer":
        return False
    from ..models.multiscale_vq import phi_index

    settings = {name: p.default for name, p in model_parameters(MultiScaleVQModel).items()} | config.model
    try:
        if abs(float(settings["quant_resi"])) <= 1e-6:  # no Phi convs at all
            return False
        scales, share = len(settings["patch_nums"]), int(settings["share_quant_resi"])
        num_phi = share if share > 0 else scales
        return len({phi_index(k, scales, num_phi) for k in range(scales)}) < num_phi
    except (TypeError, ValueError, KeyError):  # a bad setting: the model's constructor names it
        return False


def _load_tokenizer(model_class, config):
    """The frozen image tokenizer of a transformer task: ``tokenizer_path``, or the ``lora.base`` pipeline's."""
    key = "tokenizer_path" if config.lora is None else "lora.base"
    return _load_pretrained(model_class, lora.tokenizer_path(config), key)


def _drop_mask(batch_size: int, rate: float) -> torch.Tensor:
    """(B,) bool: rows whose condition is dropped for classifier-free guidance (global torch RNG, checkpointed)."""
    return torch.rand(batch_size) < rate


def _check_vq_resolution(config, tokenizer: MultiScaleVQModel) -> None:
    size = tokenizer.latent_size * tokenizer.downsample_factor
    if config.resolution != size:
        raise ValueError(
            f"`resolution` {config.resolution} does not match the tokenizer's {size}: set resolution={size}."
        )


def default_resolution(task: str, model) -> int:
    """``resolution`` when the config gives none: what the tokenizer tasks' model settings (``model`` over the model
    class's defaults) need, so that they train without a config; 64 for the transformer tasks (their tokenizer fixes
    the size, and a mismatch says which). A ``model`` section that gives no size falls back to 64; building the
    model then names its fault."""
    if task not in ("tokenizer", "bitwise_tokenizer") or not isinstance(model, dict):
        return 64
    model_class = TASKS[task].model_class
    settings = {name: p.default for name, p in model_parameters(model_class).items()} | model
    try:
        if task == "tokenizer":
            size = int(settings["patch_nums"][-1]) * 2 ** (len(settings["ch_mult"]) - 1)
        else:
            ppt = 2 ** (len(settings["encoder_ch_mult"]) - 1) * (2 if settings["spatial_patchify"] else 1)
            squares = [h for h, w in supported_pixel_sizes(ppt) if h == w]
            size = 64 if 64 in squares else min(squares)  # 64: the size every task took before (runs resume)
    except (TypeError, ValueError, IndexError, KeyError):
        return 64
    return size if size >= 1 else 64  # a bad setting is named by the model section's checks, not as `resolution`


def bitwise_schedule(resolution: int, vae: BitwiseMultiScaleVAE) -> list[tuple[int, int]]:
    """The square Infinity schedule whose last grid covers exactly ``resolution`` pixels with this VAE."""
    ppt = vae.pixels_per_token
    sizes = sorted({h for h, w in supported_pixel_sizes(ppt) if h == w})
    try:
        schedule = schedule_for_pixels(resolution, resolution, ppt)
    except ValueError:
        schedule = None
    if schedule is None or schedule[-1][0] * ppt != resolution:
        raise ValueError(
            f"`resolution` {resolution} is not a square size of Infinity's schedules for a VAE with "
            f"{ppt} pixels per token (2 ** (len(encoder_ch_mult) - 1), x2 with spatial_patchify); "
            f"supported: {sizes}; set resolution= to one of them."
        )
    return schedule


def _token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float):
    """Mean cross-entropy over all tokens of all scales (each position weighs 1/L, as VAR / STAR) + accuracy. Metrics
    stay tensors on the device (every task's): the trainer reads them at logged steps only, since reading one waits
    for the GPU."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), label_smoothing=label_smoothing)
    return loss, {"token_accuracy": (logits.argmax(-1) == targets).float().mean()}


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def _frozen_latent(encode, images: torch.Tensor, precision: str) -> torch.Tensor:
    """The frozen tokenizer's continuous latent of ``images`` in float32, its encoder (``encode``) under autocast
    in ``precision`` (``tokenizer_precision``: no, bf16, fp16). A batch whose reduced-precision latent is not finite
    (an fp16 overflow) is encoded again in float32, with a warning."""
    if precision == "no":
        return encode(images).float()
    with torch.autocast(images.device.type, dtype=AUTOCAST_DTYPES[precision]):
        latent = encode(images).float()
    # fp16 only (bf16 has float32's range); waits for the encoder, whose result the step needs next anyway
    if precision == "fp16" and not bool(torch.isfinite(latent).all()):
        warnings.warn(  # shown once: every such batch is encoded again
            "`tokenizer_precision=fp16`: the tokenizer's encoder overflowed on a batch, which was encoded again in "
            "float32 (as every such batch will be); set tokenizer_precision to 'bf16' or 'no' if this is slow.",
            stacklevel=2,
        )
        latent = encode(images).float()
    return latent


def _vq_indices(tokenizer: MultiScaleVQModel, images: torch.Tensor, precision: str) -> list[torch.Tensor]:
    """The frozen VQ tokenizer's token pyramid of ``images``, its encoder in ``precision`` (:func:`_frozen_latent`)."""
    return tokenizer.quantize_latent(_frozen_latent(tokenizer.encode_latent, images, precision))


@torch.no_grad()
def _vq_teacher_forcing(tokenizer: MultiScaleVQModel, images: torch.Tensor, precision: str):
    indices = _vq_indices(tokenizer, images, precision)
    return tokenizer.teacher_forcing_input(indices), torch.cat(indices, dim=1)


class _ReconstructionTask:
    """Shared by the tokenizer tasks: a reconstruction grid as samples, the bare model as export."""

    collate = staticmethod(collate)
    model_keys_set_by_trainer: dict[str, str] = {}  # constructor arguments the trainer sets: key -> from what
    model_keys_refused: dict[str, str] = {}  # constructor arguments of parts the task does not train: key -> why
    model_keys_fixed = {"in_channels": 3, "out_channels": 3}  # the training images are RGB
    model_init_keys: dict[str, str] = {}  # `model` keys that are not constructor arguments: key -> kind of value

    @torch.no_grad()
    def save_samples(self, model, path: Path) -> None:
        count = min(8, len(self.dataset))  # a dataset of fewer images shows them all
        images = torch.stack([self.dataset[i]["pixel_values"] for i in range(count)]).to(model.device)
        was_training = model.training
        model.eval()
        recon = self.reconstruct(model, images)
        model.train(was_training)
        _save_grid((torch.cat([images, recon]) + 1) / 2, path, columns=count)  # the images over their reconstructions

    def export(self, model, output_dir: Path) -> None:
        atomic_save_pipeline(_AtomicFolder(model.eval()), output_dir, overwrite=True)


class _PipelineTask:
    """Shared by the transformer tasks: samples and export go through the matching pipeline."""

    collate = staticmethod(collate)
    model_keys_set_by_trainer: dict[str, str] = {}
    model_keys_refused: dict[str, str] = {}
    model_init_keys: dict[str, str] = {}

    @torch.no_grad()
    def save_samples(self, model, path: Path) -> None:
        was_training = model.training
        text_encoder = getattr(self, "text_encoder", None)  # in train mode when it is trained (LoRA)
        text_was_training = text_encoder is not None and text_encoder.training
        model.eval()
        if text_encoder is not None:
            text_encoder.eval()
        pipe = self.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        images = self.sample(pipe, torch.Generator().manual_seed(0))
        model.train(was_training)
        if text_encoder is not None:
            text_encoder.train(text_was_training)
        _save_grid(images, path)

    def export(self, model, output_dir: Path) -> None:
        atomic_save_pipeline(self.pipeline(model.eval()), output_dir, overwrite=True)

    def sample_prompts(self, count: int = 8) -> list[str]:
        return [self.dataset[i]["caption"] for i in range(min(count, len(self.dataset)))]


class TokenizerTask(_ReconstructionTask):
    """MultiScaleVQModel: L1 + L2 reconstruction plus the multi-scale VQ loss; codebook usage reported.
    (The original also uses LPIPS and a GAN loss; both need pretrained weights from outside and are left out.)"""

    model_class = MultiScaleVQModel

    def __init__(self, config, device):
        self.config = config
        self.dataset = build_dataset(config.data, config.resolution)
        self.model = _construct(MultiScaleVQModel, config.model)
        if config.resolution != self.model.latent_size * self.model.downsample_factor:
            raise ValueError(
                f"`resolution` {config.resolution} must equal patch_nums[-1] * 2**(len(ch_mult)-1) = "
                f"{self.model.latent_size * self.model.downsample_factor} for this tokenizer config (leave "
                "`resolution` out to train at that size)."
            )

    def loss(self, model, batch):
        images = batch["pixel_values"]
        recon, vq_loss, _ = model(images, return_dict=False)
        recon = recon.float()
        l1, l2 = F.l1_loss(recon, images), F.mse_loss(recon, images)
        c = self.config
        total = c.recon_l1_weight * l1 + c.recon_l2_weight * l2 + c.vq_loss_weight * vq_loss
        usage = _unwrap(model).quantize.codebook_usage
        return total, {
            "l1": l1.detach(),
            "l2": l2.detach(),
            "vq_loss": vq_loss.detach(),
            "codebook_usage": (usage.sum(0) > 1e-3).float().mean(),
        }

    @staticmethod
    def reconstruct(model, images):
        return model.decode_indices(model.encode_indices(images))


def bsq_losses(quantizer_inputs, inv_temperature: float):
    """BSQ auxiliary losses over the scales (Zhao et al. 2024, "Image and Video Tokenization with Binary
    Spherical Quantization"), averaged over scales.

    Per scale the (area-resized) residual is L2-normalised to ``u`` and quantised to ``q = sign(u) / sqrt(d)``.

    * commitment: ``||u - sg(q)||^2`` (summed over the d channels, averaged over positions);
    * soft bit assignment: ``p = sigmoid(4 * inv_temperature * u / sqrt(d))``, the probability that a channel's
      bit is 1 under a softmax over the two codes ``+-1/sqrt(d)`` (distances scaled by ``inv_temperature``); BSQ's
      codebook factorises over channels, so both entropies are sums of binary entropies:
      per-sample entropy ``mean_positions sum_c H(p)`` (to minimise: confident codes) and codebook entropy
      ``sum_c H(mean_positions p)`` (to maximise: all codes used). Both are returned per channel, in nats.
    """
    commit = per_sample = codebook = 0.0
    for residual in quantizer_inputs:
        residual = residual.float()
        d = residual.shape[1]
        unit = F.normalize(residual, dim=1, eps=1e-12)
        code = torch.where(unit > 0, 1.0, -1.0) / d**0.5
        commit = commit + (unit - code.detach()).pow(2).sum(1).mean()
        prob = torch.sigmoid(4 * inv_temperature * unit / d**0.5).clamp(1e-6, 1 - 1e-6)  # (B, d, h, w)

        def binary_entropy(p):
            return -(p * p.log() + (1 - p) * (1 - p).log())

        per_sample = per_sample + binary_entropy(prob).mean()
        codebook = codebook + binary_entropy(prob.mean(dim=(0, 2, 3))).mean()
    n = len(quantizer_inputs)
    return commit / n, per_sample / n, codebook / n


class BitwiseTokenizerTask(_ReconstructionTask):
    """BitwiseMultiScaleVAE (Infinity's BSQ tokenizer): L1 + L2 reconstruction of the image decoded from the
    multi-scale straight-through BSQ code, plus BSQ's commitment loss and entropy penalty
    (``bsq_entropy_weight * (per-sample entropy - bsq_codebook_entropy_weight * codebook entropy)``, see
    :func:`bsq_losses`), on the square Infinity schedule of ``resolution``. Reported: ``bit_balance``, the
    codebook entropy of the hard bits in bits per channel (1.0: every bit is 1 half of the time).

    The original also trains with LPIPS and a GAN discriminator; both need pretrained weights from outside
    (VGG / DINO) and are left out, so reconstructions are blurrier than the released tokenizers'.
    """

    model_class = BitwiseMultiScaleVAE

    def __init__(self, config, device):
        self.config = config
        self.dataset = build_dataset(config.data, config.resolution)
        self.model = _construct(BitwiseMultiScaleVAE, config.model)
        self.schedule = bitwise_schedule(config.resolution, self.model)

    def loss(self, model, batch):
        images = batch["pixel_values"]
        recon, encoded = model(images, self.schedule)
        recon = recon.float()
        c = self.config
        l1, l2 = F.l1_loss(recon, images), F.mse_loss(recon, images)
        commit, per_sample, codebook = bsq_losses(encoded.quantizer_inputs, c.bsq_inv_temperature)
        entropy = per_sample - c.bsq_codebook_entropy_weight * codebook
        total = (
            c.recon_l1_weight * l1
            + c.recon_l2_weight * l2
            + c.bsq_commit_weight * commit
            + c.bsq_entropy_weight * entropy
        )
        with torch.no_grad():
            ones = (
                torch.cat([b.reshape(-1, b.shape[-1]).float() for b in encoded.bit_labels])
                .mean(0)
                .clamp(1e-6, 1 - 1e-6)
            )
            balance = (-(ones * ones.log2() + (1 - ones) * (1 - ones).log2())).mean()
        return total, {
            "l1": l1.detach(),
            "l2": l2.detach(),
            "commit": commit.detach(),
            "per_sample_entropy": per_sample.detach(),
            "codebook_entropy": codebook.detach(),
            "bit_balance": balance,
        }

    def reconstruct(self, model, images):
        return model.decode_bit_labels(model.encode(images, self.schedule).bit_labels)


class _RelabelledDataset(torch.utils.data.Dataset):
    """``dataset`` with each item's class label ``i`` replaced by ``ids[i]`` (class folders -> a LoRA base's ids)."""

    def __init__(self, dataset, ids: list[int]):
        self.dataset, self.ids = dataset, ids
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {**item, "class_labels": self.ids[int(item["class_labels"])]}


class TokenCachedDataset(torch.utils.data.Dataset):
    """A dataset whose items also carry ``token_indices`` (L,): every image encoded once, up front, by the frozen
    tokenizer (``data.cache_tokens: true``). Only for data without random augmentation (the shapes are deterministic):
    training then skips the tokenizer's encoder at every step, which dominates a small transformer's step on a CPU."""

    def __init__(self, dataset, tokenizer: MultiScaleVQModel, device, precision: str = "no", chunk: int = 256):
        self.dataset = dataset
        pieces = []
        with torch.no_grad():
            for start in range(0, len(dataset), chunk):
                end = min(start + chunk, len(dataset))
                images = torch.stack([dataset[i]["pixel_values"] for i in range(start, end)])
                pieces.append(torch.cat(_vq_indices(tokenizer, images.to(device), precision), dim=1).cpu())
        self.token_indices = torch.cat(pieces)
        if hasattr(dataset, "class_names"):
            self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "token_indices": self.token_indices[index]}


def _collate_with_tokens(items: list[dict], num_classes: int | None = None) -> dict:
    """The batch; with ``num_classes``, its class labels checked here, on the CPU (in the loader's workers): the
    model's own range check would wait for the GPU at every step, and an index past the class table on a GPU is a
    device-side assert, not an error naming the data."""
    batch = collate(items)
    if "token_indices" in items[0]:
        batch["token_indices"] = torch.stack([it["token_indices"] for it in items])
    labels = batch.get("class_labels")
    if num_classes is not None and labels is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`data`: class label {low if low < 0 else high} is outside [0, {num_classes - 1}], the model's "
                f"{num_classes} classes (`model.num_classes`, or the classes found in the data)."
            )
    return batch


@torch.no_grad()
def init_from_larger_var_(model: VARTransformer2DModel, source: VARTransformer2DModel, blocks=None) -> None:
    """Start ``model`` from a trained VAR of the same width, tokenizer and classes (``model.init_from`` /
    ``model.init_blocks`` of a config): its embeddings, head and the blocks listed in ``blocks`` (default the first
    ``depth``), the rest of its blocks dropped. A quick way to a small refiner for CoDe. ValueError naming the setting
    when the two do not fit."""
    blocks = list(range(len(model.blocks))) if blocks is None else [int(b) for b in blocks]
    if len(blocks) != len(model.blocks) or not all(0 <= b < len(source.blocks) for b in blocks):
        raise ValueError(
            f"`model.init_blocks` must list {len(model.blocks)} block indices of the source's "
            f"{len(source.blocks)}, got {blocks}."
        )
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.")}
    for i, b in enumerate(blocks):
        prefix = f"blocks.{b}."
        state.update(
            {f"blocks.{i}.{k[len(prefix) :]}": v for k, v in source.state_dict().items() if k.startswith(prefix)}
        )
    own = model.state_dict()
    wrong = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    if wrong:
        raise ValueError(
            f"`model.init_from`: the source does not fit this model (width, classes, tokenizer); "
            f"mismatched: {wrong[:5]}."
        )
    model.load_state_dict(state)


class VARTask(_PipelineTask):
    """VARTransformer2DModel on a frozen tokenizer: cross-entropy on every scale's tokens with
    label dropout (``cond_drop_rate``) for classifier-free guidance and optional label smoothing.
    ``data.cache_tokens: true`` encodes the dataset once up front (:class:`TokenCachedDataset`)."""

    collate = staticmethod(_collate_with_tokens)
    model_class = VARTransformer2DModel
    model_keys_set_by_trainer = {
        "vocab_size": "the tokenizer",
        "latent_channels": "the tokenizer",
        "patch_nums": "the tokenizer",
        "cond_drop_rate": "the top-level `cond_drop_rate`",
    }
    model_init_keys = {"init_adaln_gamma": "number", "init_from": "path", "init_blocks": "indices"}

    def __init__(self, config, device):
        self.config = config
        self.dataset = build_dataset(config.data, config.resolution, need_labels=True)
        self.tokenizer = _frozen(_load_tokenizer(MultiScaleVQModel, config), device)
        tok = self.tokenizer.config
        _check_vq_resolution(config, self.tokenizer)
        if config.data.get("cache_tokens", False):
            self.dataset = TokenCachedDataset(self.dataset, self.tokenizer, device, config.tokenizer_precision)
        self.num_classes, self.id2label = self._classes()
        self.sample_labels = list(range(self.num_classes))
        self._classes_of_the_lora_base()
        model_args = dict(config.model)
        init_adaln_gamma = float(model_args.pop("init_adaln_gamma", 1e-3))
        init_from, init_blocks = model_args.pop("init_from", None), model_args.pop("init_blocks", None)
        model_args.setdefault("num_classes", self.num_classes)
        _original_drop_path(model_args, VARTransformer2DModel)
        model_args.update(
            vocab_size=tok.vocab_size,
            latent_channels=tok.z_channels,
            patch_nums=list(tok.patch_nums),
            cond_drop_rate=config.cond_drop_rate,
        )

        def build():
            model = _new(VARTransformer2DModel, model_args, init_adaln_gamma=init_adaln_gamma)
            if init_from is not None:
                source = _load_pretrained(VARTransformer2DModel, init_from, "model.init_from")
                init_from_larger_var_(model, source, init_blocks)
            return model

        self.model = lora.transformer_for_training(config, VARTransformer2DModel, build)
        model_classes = self.model.config.num_classes
        if model_classes < self.num_classes:  # now, before the output folder is touched, not at the first batch
            raise ValueError(
                f"`model.num_classes` ({model_classes}) is below the {self.num_classes} classes found in the data."
            )
        self.collate = functools.partial(_collate_with_tokens, num_classes=model_classes)

    def _classes_of_the_lora_base(self) -> None:
        """A LoRA on class folders trains the base pipeline's classes of those names: folder ``red circle on green``
        is the base's id of that name, not its position among the folders (which taught another class without a
        word); a folder may also be named by its class index. A base without class names, or folders for every class
        of it (ImageNet's synset folders, sorted as the ids), keep the folders' order; another folder name is
        refused."""
        names = getattr(self.dataset, "class_names", None)
        base = lora.settings_of(self.config)
        if base is None or not names:
            return
        from ..pipelines.pipeline_var import label_ids

        index = json.loads((Path(base.base) / "model_index.json").read_text())
        if not isinstance(index.get("id2label"), dict):
            warnings.warn(
                f"`lora.base` has no class names: the {len(names)} class folders train class ids 0..{len(names) - 1} "
                "in the order of their sorted names.",
                UserWarning,
                stacklevel=2,
            )
            return
        id2label = {int(key): value for key, value in index["id2label"].items()}
        base_ids = label_ids(id2label)
        ids = [  # by class name, else by class index (ASCII digits: "²" is a digit to str.isdigit, not to int())
            base_ids.get(name, int(name) if re.fullmatch(r"[0-9]+", name) and int(name) in id2label else None)
            for name in names
        ]
        unknown = [name for name, class_id in zip(names, ids) if class_id is None]
        if unknown and len(names) == len(id2label):  # every class, in the order of its ids (ImageNet's synset folders)
            return
        if unknown:
            raise ValueError(
                f"`data.path`: the class folders {unknown[:5]} are no class names of `lora.base` (a LoRA trains the "
                f"base's classes: name each folder after one of its {len(base_ids)} names, e.g. "
                f"{list(base_ids)[:3]} (`pipe.labels`), or by its class index)."
            )
        self.dataset = _RelabelledDataset(self.dataset, ids)
        self.num_classes = max(ids) + 1
        self.id2label = id2label
        self.sample_labels = ids

    def _classes(self):
        dataset = self.dataset
        if hasattr(dataset, "class_names") and dataset.class_names:
            return len(dataset.class_names), dict(enumerate(dataset.class_names))
        if self.config.data.get("type") == "shapes":
            from .. import shapes

            return shapes.NUM_CLASSES, shapes.id2label()
        inner = dataset  # under the token cache / repeats: the HF dataset, whose labels were read up front
        while not isinstance(inner, HFDataset) and isinstance(
            getattr(inner, "dataset", None), torch.utils.data.Dataset
        ):
            inner = inner.dataset
        if isinstance(inner, HFDataset) and inner.labels is not None:
            # every row's label, not a sample of the first rows (a dataset sorted by label had one class), and no
            # image decoded; a ClassLabel column also counts the classes that no row has
            count = int(inner.labels.max()) + 1 if len(inner.labels) else 1
            feature = (getattr(inner.dataset, "features", None) or {}).get(inner.columns[1])
            declared = getattr(feature, "num_classes", None)
            if isinstance(declared, int) and not isinstance(declared, bool):
                count = max(count, declared)
            return count, None
        labels = {int(dataset[i]["class_labels"]) for i in range(len(dataset))}
        return max(labels) + 1, None

    def loss(self, model, batch):
        if "token_indices" in batch:
            targets = batch["token_indices"].to(batch["class_labels"].device)
            with torch.no_grad():
                counts = [pn * pn for pn in self.tokenizer.config.patch_nums]
                tf_input = self.tokenizer.teacher_forcing_input(list(targets.split(counts, dim=1)))
        else:
            tf_input, targets = _vq_teacher_forcing(
                self.tokenizer, batch["pixel_values"], self.config.tokenizer_precision
            )
        logits = model(batch["class_labels"], tf_input, drop_labels=True).logits
        return _token_cross_entropy(logits, targets, self.config.label_smoothing)

    def pipeline(self, model):
        from ..pipelines.pipeline_var import VARPipeline

        return VARPipeline(transformer=model, vqvae=self.tokenizer, id2label=self.id2label)

    def sample(self, pipe, generator):
        labels = [self.sample_labels[i % len(self.sample_labels)] for i in range(16)]
        return pipe(
            class_labels=labels, generator=generator, guidance_scale=2.0, top_k=0, top_p=0.0, output_type="pt"
        ).images


class STARTask(_PipelineTask):
    """STARTransformer2DModel on a frozen MultiScaleVQModel and a frozen text encoder (CLIP in the releases).

    Each caption is replaced by ``""`` with probability ``cond_drop_rate`` (0.1 in the original) and the batch
    is encoded once, under no_grad, by the pipeline's own :meth:`STARPipeline.encode_text`, so training sees
    exactly the features that generation does. Loss: cross-entropy of every scale's tokens (weight 1/L,
    ``label_smoothing`` 0 in the original). (The original drops only captions longer than 20 characters, a
    quirk of its LMDB loader; here every caption may be dropped.) Trained without the stable-sampler head.
    """

    model_class = STARTransformer2DModel
    model_keys_set_by_trainer = {
        "vocab_size": "the tokenizer",
        "latent_channels": "the tokenizer",
        "patch_nums": "the tokenizer",
        "text_embed_dim": "the text encoder",
        "cond_drop_rate": "the top-level `cond_drop_rate`",
    }
    # the loss trains the main head only: an exported sampler head would keep its random weights, and generation
    # uses it by default when the transformer has one
    model_keys_refused = dict.fromkeys(
        ("stable_sampler", "sampler_depth", "sampler_start_scale"),
        "does not train the stable-sampler head (the export would carry it untrained, and generation uses it "
        "by default)",
    )
    model_init_keys = {"init_head": "number"}

    def __init__(self, config, device):
        self.config, self.device = config, device
        self.dataset = build_dataset(config.data, config.resolution, need_captions=True)
        self.tokenizer = _frozen(_load_tokenizer(MultiScaleVQModel, config), device)
        _check_vq_resolution(config, self.tokenizer)
        self.text_encoder, self.text_tokenizer = load_text_encoder(lora.text_encoder_path(config), device)
        self.trainable_text_encoder = lora.text_encoder_for_training(config, self.text_encoder)
        tok = self.tokenizer.config
        model_args = dict(config.model)
        init_head = float(model_args.pop("init_head", 0.02))
        model_args.setdefault("num_legacy_classes", 0)
        _original_drop_path(model_args, STARTransformer2DModel)
        model_args.update(
            vocab_size=tok.vocab_size,
            latent_channels=tok.z_channels,
            patch_nums=list(tok.patch_nums),
            text_embed_dim=text_hidden_size(self.text_encoder),
            cond_drop_rate=config.cond_drop_rate,
        )
        self.model = lora.transformer_for_training(
            config, STARTransformer2DModel, lambda: _new(STARTransformer2DModel, model_args, init_head=init_head)
        )
        self.text_pipe = self.pipeline(self.model)  # its encode_text only

    def loss(self, model, batch):
        drop = _drop_mask(len(batch["caption"]), self.config.cond_drop_rate).tolist()
        texts = ["" if dropped else caption for caption, dropped in zip(batch["caption"], drop)]
        tf_input, targets = _vq_teacher_forcing(self.tokenizer, batch["pixel_values"], self.config.tokenizer_precision)
        hidden, mask, pooled = self.encode_text(texts)
        logits = model(tf_input, hidden, mask, pooled).logits
        return _token_cross_entropy(logits, targets, self.config.label_smoothing)

    def encode_text(self, texts: list[str]):
        """The pipeline's ``encode_text`` (frozen text encoder), or the same computation with gradients through the
        trained text encoder (``lora.train_text_encoder``; called through its accelerate wrapper)."""
        self._warn_truncated_captions(texts)
        if self.trainable_text_encoder is None:
            return self.text_pipe.encode_text(texts, self.device, warn_truncation=False)
        input_ids, attention_mask = self.text_pipe._tokenize(
            list(texts), self.text_pipe.text_max_length, self.device, warn=False
        )
        output = self.trainable_text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = output.last_hidden_state
        return hidden, attention_mask, hidden.mean(dim=1) if self.text_pipe._is_t5 else output.pooler_output

    def _warn_truncated_captions(self, texts: list[str]) -> None:
        """Once per run, not at every step (the pipeline's warning named the batch's rows as ``prompt[i]``): training
        captions longer than the text encoder takes are truncated. Looked for only until the first one is found."""
        if getattr(self, "_truncation_warned", False):
            return
        from ..pipelines.pipeline_star import t5_embedder_captions

        pipe = self.text_pipe
        captions = t5_embedder_captions(list(texts)) if pipe._is_t5 else list(texts)
        cut = pipe._truncated(captions, pipe.text_max_length)
        if cut:
            self._truncation_warned = True
            warnings.warn(
                f"training captions longer than the text encoder's {pipe.text_max_length} tokens are truncated (as "
                f"the original does), e.g. {texts[cut[0]][:60]!r}; warned once per run.",
                UserWarning,
                stacklevel=3,
            )

    def pipeline(self, model):
        from ..pipelines.pipeline_star import STARPipeline

        return STARPipeline(
            transformer=model, vqvae=self.tokenizer, text_encoder=self.text_encoder, tokenizer=self.text_tokenizer
        )

    def sample(self, pipe, generator):
        return pipe(
            prompt=self.sample_prompts(),
            generator=generator,
            guidance_scale=4.0,
            top_k=0,
            top_p=0.0,
            use_stable_sampler=False,
            output_type="pt",
        ).images


def _check_infinity_text_encoder(text_encoder, key: str) -> None:
    """Infinity's pipeline tokenises captions to 512 tokens (``PROMPT_MAX_TOKENS``, as the original): an encoder with
    fewer positions (CLIP's 77) would fail at the first step, after the output folder is made."""
    from ..pipelines.pipeline_infinity import PROMPT_MAX_TOKENS

    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions < PROMPT_MAX_TOKENS:
        raise ValueError(
            f"`{key}`: Infinity encodes captions of up to {PROMPT_MAX_TOKENS} tokens, but this "
            f"{type(text_encoder).__name__} takes at most {positions}; use a T5 encoder (e.g. google/flan-t5-xl, or "
            "tiny-t5)."
        )


class InfinityTask(_PipelineTask):
    """InfinityTransformer2DModel on a frozen BitwiseMultiScaleVAE and a frozen T5 encoder (flan-t5-xl in releases).

    * Bitwise Self-Correction: the teacher-forcing inputs come from
      :meth:`BitwiseMultiScaleVAE.teacher_forcing_inputs` with ``bsc_flip_prob`` (0.3 in the original's train.sh)
      as the maximum flip strength on the first ``bsc_num_scales`` scales (default all); labels of later scales
      are re-quantised from the corrupted sum, so the model learns to correct its own bit errors.
    * Text dropout: with probability ``cond_drop_rate`` a caption's features are replaced by the transformer's
      learned unconditional rows (``uncond_text_embeds[:len]``, what guidance uses at inference).
    * Loss: 2-way cross-entropy per bit, averaged over bits, tokens (weight 1/L) and the batch.

    The schedule is the square Infinity schedule of ``resolution`` (e.g. 64 px with a stride-4 VAE: 7 scales
    up to 16x16), so the exported pipeline generates at ``height = width = resolution``.
    """

    model_class = InfinityTransformer2DModel
    model_keys_set_by_trainer = {
        "bits_per_token": "the tokenizer",
        "text_dim": "the text encoder",
        "cond_drop_rate": "the top-level `cond_drop_rate`",
    }
    model_init_keys = {"init_adaln": "number", "init_adaln_gamma": "number", "init_head": "number"}

    def __init__(self, config, device):
        self.config, self.device = config, device
        self.dataset = build_dataset(config.data, config.resolution, need_captions=True)
        self.vae = _frozen(_load_tokenizer(BitwiseMultiScaleVAE, config), device)
        self.schedule = bitwise_schedule(config.resolution, self.vae)
        if config.bsc_num_scales is not None and config.bsc_num_scales > len(self.schedule):  # was clamped silently
            raise ValueError(
                f"`bsc_num_scales` must be in [0, {len(self.schedule)}] (the scales of the schedule of `resolution` "
                f"{config.resolution}; null: all), got {config.bsc_num_scales}."
            )
        self.text_encoder, self.text_tokenizer = load_text_encoder(lora.text_encoder_path(config), device)
        _check_infinity_text_encoder(self.text_encoder, "text_encoder_path" if config.lora is None else "lora.base")
        self.trainable_text_encoder = lora.text_encoder_for_training(config, self.text_encoder)
        text_dim = text_hidden_size(self.text_encoder)
        model_args = dict(config.model)
        init_args = {
            k: float(model_args.pop(k)) for k in ("init_adaln", "init_adaln_gamma", "init_head") if k in model_args
        }
        model_args.setdefault("block_chunks", math.gcd(int(model_args.get("depth", 32)), 8))
        _original_pool_heads(model_args, text_dim)
        model_args.setdefault("text_max_length", min(int(self.text_tokenizer.model_max_length), 512))
        model_args.update(
            bits_per_token=self.vae.bits_per_token, text_dim=text_dim, cond_drop_rate=config.cond_drop_rate
        )
        levels = model_args.get(
            "num_level_embeddings", model_parameters(InfinityTransformer2DModel)["num_level_embeddings"].default
        )
        if config.lora is None and levels < len(self.schedule):  # now, not at the first step after output_dir is made
            raise ValueError(
                f"`model.num_level_embeddings` ({levels}) must be at least the {len(self.schedule)} scales of the "
                f"schedule of `resolution` {config.resolution}."
            )
        if infinity_ffn_dim(int(model_args.get("embed_dim", 2048)), float(model_args.get("mlp_ratio", 4.0))) < 1:
            raise ValueError(
                "`model`: Infinity's FFN width round(embed_dim * mlp_ratio / 256) * 256 is 0; raise `embed_dim` "
                "or `mlp_ratio` (embed_dim * mlp_ratio >= 128)."
            )
        self.model = lora.transformer_for_training(
            config, InfinityTransformer2DModel, lambda: _new(InfinityTransformer2DModel, model_args, **init_args)
        )
        if self.model.config.num_level_embeddings < len(self.schedule):  # a LoRA base made for fewer scales
            raise ValueError(
                f"`resolution` {config.resolution}: its schedule has {len(self.schedule)} scales; the transformer of "
                f"`lora.base` supports {self.model.config.num_level_embeddings}."
            )
        self.text_pipe = self.pipeline(self.model)  # its encode_prompt only
        flips = len(self.schedule) if config.bsc_num_scales is None else int(config.bsc_num_scales)
        self.bsc_num_scales = flips if config.bsc_flip_prob > 0 else 0

    def loss(self, model, batch):
        images = batch["pixel_values"]
        with torch.no_grad():
            features = _frozen_latent(self.vae.encode_features, images, self.config.tokenizer_precision)
            inputs, labels = self.vae.teacher_forcing_inputs(
                features, self.schedule, self.bsc_num_scales, self.config.bsc_flip_prob
            )
        embeds, mask = self.encode_text(batch["caption"])
        drop = _drop_mask(images.shape[0], self.config.cond_drop_rate).to(embeds.device)
        logits = model(inputs, embeds, mask, self.schedule, drop_text=drop).logits
        logits = logits.view(*labels.shape, 2)
        labels = labels.long()
        loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), label_smoothing=self.config.label_smoothing)
        return loss, {"bit_accuracy": (logits.argmax(-1) == labels).float().mean()}

    def encode_text(self, captions: list[str]):
        """T5 features and mask of the captions as the pipeline's ``encode_prompt`` computes them (frozen text
        encoder), or the same computation with gradients through the trained text encoder (``lora.train_text_encoder``;
        called through its accelerate wrapper)."""
        pipe = self.text_pipe
        if self.trainable_text_encoder is None:
            embeds, mask, _, _ = pipe.encode_prompt(captions, self.device, do_classifier_free_guidance=False)
            return embeds, mask
        tokens = pipe.tokenizer(
            list(captions), max_length=pipe.text_max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        input_ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        embeds = self.trainable_text_encoder(input_ids=input_ids, attention_mask=mask)[0].float()
        longest = int(mask.sum(dim=1).max())
        return embeds[:, :longest] * mask[:, :longest, None], mask[:, :longest].bool()

    def pipeline(self, model):
        from ..pipelines.pipeline_infinity import InfinityPipeline

        return InfinityPipeline(
            transformer=model,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.text_tokenizer,
            default_size=[self.config.resolution, self.config.resolution],
        )

    def sample(self, pipe, generator):
        size = self.config.resolution
        return pipe(
            prompt=self.sample_prompts(),
            height=size,
            width=size,
            generator=generator,
            guidance_scale=3.0,
            tau=1.0,
            top_k=0,
            top_p=0.0,
            output_type="pt",
        ).images


TASKS = {
    "tokenizer": TokenizerTask,
    "bitwise_tokenizer": BitwiseTokenizerTask,
    "var": VARTask,
    "star": STARTask,
    "infinity": InfinityTask,
}


def build_task(config, device):
    return TASKS[config.task](config, device)
