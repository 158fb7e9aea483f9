"""What is trained: the model, its data, its loss, its export. One class per task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..conversion.common import atomic_save_pipeline
from ..models.multiscale_vq import MultiScaleVQModel
from ..models.var_transformer import VARTransformer2DModel
from .data import build_dataset, collate


def _save_grid(images_01: torch.Tensor, path: Path, columns: int = 8) -> None:
    array = (images_01.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    rows = [np.concatenate(list(array[i : i + columns]), axis=1) for i in range(0, len(array), columns)]
    rows = [np.pad(r, ((0, 0), (0, rows[0].shape[1] - r.shape[1]), (0, 0))) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.concatenate(rows, axis=0)).save(path)


class _AtomicFolder:
    """``save_pretrained``-able wrapper so a single model is exported atomically like a pipeline."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, path, safe_serialization=True):
        self.model.save_pretrained(path, safe_serialization=safe_serialization)


class TokenizerTask:
    """MultiScaleVQModel: L1 + L2 reconstruction plus the multi-scale VQ loss; codebook usage reported.
    (The original also uses LPIPS and a GAN loss; both need pretrained weights from outside and are left out.)"""

    collate = staticmethod(collate)

    def __init__(self, config, device):
        self.config = config
        self.dataset = build_dataset(config.data, config.resolution)
        self.model = MultiScaleVQModel(**config.model)
        if config.resolution != self.model.latent_size * self.model.downsample_factor:
            raise ValueError(
                f"`resolution` {config.resolution} must equal patch_nums[-1] * 2**(len(ch_mult)-1) = "
                f"{self.model.latent_size * self.model.downsample_factor} for this tokenizer config."
            )

    def loss(self, model, batch):
        images = batch["pixel_values"]
        recon, vq_loss, _ = model(images, return_dict=False)
        recon = recon.float()
        l1, l2 = F.l1_loss(recon, images), F.mse_loss(recon, images)
        c = self.config
        total = c.recon_l1_weight * l1 + c.recon_l2_weight * l2 + c.vq_loss_weight * vq_loss
        usage = model.module.quantize.codebook_usage if hasattr(model, "module") else model.quantize.codebook_usage
        return total, {"l1": l1.item(), "l2": l2.item(), "vq_loss": float(vq_loss.detach()),
                       "codebook_usage": (usage.sum(0) > 1e-3).float().mean().item()}

    @torch.no_grad()
    def save_samples(self, model, path: Path) -> None:
        images = torch.stack([self.dataset[i]["pixel_values"] for i in range(8)]).to(model.device)
        was_training = model.training
        model.eval()
        recon = model.decode_indices(model.encode_indices(images))
        model.train(was_training)
        _save_grid((torch.cat([images, recon]) + 1) / 2, path)

    def export(self, model, output_dir: Path) -> None:
        atomic_save_pipeline(_AtomicFolder(model.eval()), output_dir, overwrite=True)


class VARTask:
    """VARTransformer2DModel on a frozen tokenizer: cross-entropy on every scale's tokens with
    label dropout (``cond_drop_rate``) for classifier-free guidance and optional label smoothing."""

    collate = staticmethod(collate)

    def __init__(self, config, device):
        self.config = config
        self.dataset = build_dataset(config.data, config.resolution, need_labels=True)
        self.tokenizer = MultiScaleVQModel.from_pretrained(config.tokenizer_path).to(device).eval().requires_grad_(False)
        tok = self.tokenizer.config
        if config.resolution != self.tokenizer.latent_size * self.tokenizer.downsample_factor:
            raise ValueError(f"`resolution` {config.resolution} does not match the tokenizer's {self.tokenizer.latent_size * self.tokenizer.downsample_factor}.")
        self.num_classes, self.id2label = self._classes()
        model_args = dict(config.model)
        init_adaln_gamma = float(model_args.pop("init_adaln_gamma", 1e-3))
        model_args.setdefault("num_classes", self.num_classes)
        model_args.update(vocab_size=tok.vocab_size, latent_channels=tok.z_channels, patch_nums=list(tok.patch_nums),
                          cond_drop_rate=config.cond_drop_rate)
        self.model = VARTransformer2DModel(**model_args)
        self.model.init_weights(init_adaln_gamma=init_adaln_gamma)

    def _classes(self):
        dataset = self.dataset
        if hasattr(dataset, "class_names") and dataset.class_names:
            return len(dataset.class_names), dict(enumerate(dataset.class_names))
        if self.config.data.get("type") == "shapes":
            from .. import shapes

            return shapes.NUM_CLASSES, shapes.id2label()
        labels = {int(dataset[i]["class_labels"]) for i in range(min(len(dataset), 2000))}
        return max(labels) + 1, None

    def loss(self, model, batch):
        with torch.no_grad():
            indices = self.tokenizer.encode_indices(batch["pixel_values"])
            tf_input = self.tokenizer.teacher_forcing_input(indices)
            targets = torch.cat(indices, dim=1)
        logits = model(batch["class_labels"], tf_input, drop_labels=True).logits
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(-1) == targets).float().mean().item()
        return loss, {"token_accuracy": accuracy}

    def pipeline(self, model):
        from ..pipelines.pipeline_var import VARPipeline

        return VARPipeline(transformer=model, vqvae=self.tokenizer, id2label=self.id2label)

    @torch.no_grad()
    def save_samples(self, model, path: Path) -> None:
        was_training = model.training
        model.eval()
        pipe = self.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        labels = [i % self.num_classes for i in range(16)]
        images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), guidance_scale=2.0, top_k=0, top_p=0.0,
                      output_type="pt").images
        model.train(was_training)
        _save_grid(images, path)

    def export(self, model, output_dir: Path) -> None:
        atomic_save_pipeline(self.pipeline(model.eval()), output_dir, overwrite=True)


TASKS = {"tokenizer": TokenizerTask, "var": VARTask}


def build_task(config, device):
    return TASKS[config.task](config, device)
