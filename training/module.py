"""`ImageClassifier`: the LightningModule that trains a `vit` model and evaluates it at several resolutions."""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ndrope.modules import ResolutionMode
from vit import AttnLogitScale, check_image_sizes, draw_image_size

from .data import check_protocols
from .report import format_eval_table, write_eval_report
from .schedule import warmup_cosine
from .transforms import EvalProtocol


def eval_folder(stage: str, resolution_mode: str | None = None, attn_logit_scale: str | None = None) -> str:
    """The run folder's subfolder of one evaluation: ``test``, or ``test-interpolate``, ``test-log-length``,
    ``test-interpolate-log-length`` when those evaluation options are given (``"none"`` scale: ``test``)."""
    options = [resolution_mode, None if attn_logit_scale == "none" else attn_logit_scale]
    return "-".join([stage, *(option for option in options if option)])


def resize(images: Tensor, resolution: int) -> Tensor:
    """Images (B, C, r, r) at ``resolution`` (bilinear, antialiased when shrinking); unchanged at their own size."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)


def net_geometry(net: nn.Module) -> tuple[int, int]:
    """(patch_size, img_size) of a square-patch image ViT: read from ``net.patch_embed`` (timm's layout)."""
    embed = getattr(net, "patch_embed", None)
    patch, size = getattr(embed, "patch_size", None), getattr(embed, "img_size", None)
    if patch is None or size is None:
        raise TypeError(
            f"net ({type(net).__name__}) has no patch_embed.patch_size / patch_embed.img_size; ImageClassifier "
            "needs a timm-style ViT such as vit.NDRopeVisionTransformer"
        )
    patch, size = tuple(patch) if isinstance(patch, (tuple, list)) else (patch,), (
        tuple(size) if isinstance(size, (tuple, list)) else (size,)
    )
    if len(set(patch)) != 1 or len(set(size)) != 1:
        raise ValueError(f"net has patch_size={patch}, img_size={size}; ImageClassifier needs square images and patches")
    return int(patch[0]), int(size[0])


def accuracy_metrics(num_classes: int) -> MetricCollection:
    """Top-1, plus top-5 when there are more than 10 classes; inputs are logits (B, num_classes) and labels (B,)."""
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 10:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class ImageClassifier(LightningModule):
    """Classification with AdamW, warmup + cosine, label smoothing and optional mixup/cutmix.

    Args:
        net: the network, images (B, C, r, r) -> logits (B, num_classes) for any r that is a multiple of
            its patch size; in YAML ``class_path: vit.NDRopeVisionTransformer`` with ``init_args``
            (train.py links ``img_size``, ``num_classes`` and ``in_chans`` from the data).
        lr: peak learning rate, reached after ``warmup_epochs``.
        weight_decay: AdamW decay, not applied to biases, norms and the model's ``no_weight_decay()``.
        warmup_epochs: linear warmup length (fractions allowed), then cosine decay per step.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        label_smoothing: for the cross-entropy (and inside mixup targets).
        mixup_alpha, cutmix_alpha: timm Mixup/CutMix strengths; both 0 disables them.
        train_resolutions: multi-resolution training (FlexiViT, ResFormer): each training batch is resized
            to one of these resolutions (multiples of the patch size), drawn by (seed, epoch, batch): the
            same on every rank and again after a resume. None trains at ``img_size`` only. Validation and
            the RoPE reference grid stay at ``img_size``.
        packing: NaFlex-style packed batches: each training image is resized to its own size (drawn from
            ``train_resolutions`` by seed, epoch and sample) and a batch runs as one packed sequence
            (``net.forward_packed``: per-image positions, a block-diagonal mask); validation and test batches
            run packed too. Needs a net with ``forward_packed`` (`vit.NDRopeVisionTransformer`).
        compile: ``torch.compile(fullgraph=True, dynamic=True)`` the network (checkpoint keys are unchanged), in
            `configure_model` after any sharding: evaluation at every test resolution reuses one graph.
        eval_resolutions: test resolutions, each a multiple of the patch size; default the training one.
        eval_protocols: how test images reach each resolution, `training.transforms.EvalProtocol`
            (default ``["zoom"]``); results are keyed by (protocol, resolution).
        resolution_mode: passed to ``net.set_resolution_mode`` (how positions adapt to another grid);
            None keeps the model's default.
        attn_logit_scale: passed to ``net.set_attn_logit_scale`` (``"log-length"``: attention logits
            times log(n) / log(n_train) at other resolutions); None keeps the model's setting.

    Test results are written to ``<trainer.log_dir>/eval.json`` and ``eval.csv``.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        train_resolutions: list[int] | None = None,
        packing: bool = False,
        compile: bool = False,
        eval_resolutions: list[int] | None = None,
        eval_protocols: list[EvalProtocol] | None = None,
        resolution_mode: ResolutionMode | None = None,
        attn_logit_scale: AttnLogitScale | None = None,
    ) -> None:
        super().__init__()
        # Evaluation and runtime switches stay out of the checkpoint, so a checkpoint's hyperparameters
        # describe what was trained. Under LightningCLI `net` is saved as its class_path/init_args config;
        # a net passed from Python is not a hyperparameter (its weights are in the state dict), so it is dropped.
        runtime = ["eval_resolutions", "eval_protocols", "resolution_mode", "attn_logit_scale", "compile"]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attribute 'net' is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=runtime)
        if isinstance(self.hparams.get("net"), nn.Module):
            self.save_hyperparameters(ignore=[*runtime, "net"])
        self.resolution_mode, self.attn_logit_scale = resolution_mode, attn_logit_scale
        self.patch_size, self.train_resolution = net_geometry(net)
        self.eval_resolutions = list(eval_resolutions or [self.train_resolution])
        if packing and not callable(getattr(net, "forward_packed", None)):
            raise TypeError(f"packing=True needs a net with forward_packed (vit.NDRopeVisionTransformer), not {type(net).__name__}")
        self.packing = packing
        self.train_resolutions = None if train_resolutions is None else list(
            check_image_sizes(train_resolutions, self.patch_size, name="train_resolutions")
        )
        self.eval_protocols = check_protocols(eval_protocols)
        for name, sizes in (("img_size", [self.train_resolution]), ("eval_resolutions", self.eval_resolutions)):
            bad = [r for r in sizes if r < self.patch_size or r % self.patch_size]
            if bad:
                raise ValueError(
                    f"{name}={sizes}: {bad} not a positive multiple of patch_size={self.patch_size}; "
                    f"use multiples such as {[self.patch_size * k for k in range(2, 6)]}"
                )
        num_classes = getattr(net, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"net.num_classes={num_classes!r}: the classifier needs an int number of classes >= 2")
        self.net = net
        if resolution_mode is not None:
            self.net.set_resolution_mode(resolution_mode)
        if attn_logit_scale is not None:
            if not hasattr(self.net, "set_attn_logit_scale"):
                raise TypeError(f"attn_logit_scale={attn_logit_scale!r} needs a net with set_attn_logit_scale "
                                f"(vit.NDRopeVisionTransformer), got {type(net).__name__}")  # fmt: skip
            self.net.set_attn_logit_scale(attn_logit_scale)
        self.compile_net = compile
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.criterion = (
            SoftTargetCrossEntropy() if self.mixup else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        )
        self.val_metrics = accuracy_metrics(num_classes).clone(prefix="val/")
        self.eval_keys = [(p, r) for p in self.eval_protocols for r in self.eval_resolutions]
        self.test_metrics = nn.ModuleList(accuracy_metrics(num_classes) for _ in self.eval_keys)
        self.eval_results: dict[tuple[str, int], dict[str, float]] = {}
        self.test_samples = [0] * len(self.eval_keys)

    def configure_model(self) -> None:
        """Called by the Trainer once its strategy is set up. With a device mesh (Lightning's
        `ModelParallelStrategy`) the network is sharded with FSDP2 over the mesh's data-parallel dim: each
        transformer block, then the rest (embeddings, head, RoPE frequencies); with ``compile`` it is then
        compiled. Idempotent: fit then test in one process configure once."""
        if getattr(self, "_configured", False):
            return
        mesh = self.device_mesh
        if mesh is not None:
            if mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    f"ModelParallelStrategy(tensor_parallel_size={mesh['tensor_parallel'].size()}): tensor parallelism "
                    "is not implemented for these ViTs; use tensor_parallel_size=1 (FSDP2 over every device)"
                )
            from torch.distributed.fsdp import fully_shard

            for block in self.net.blocks:
                fully_shard(block, mesh=mesh["data_parallel"])
            fully_shard(self.net, mesh=mesh["data_parallel"])
        if self.compile_net:  # one graph for every resolution (vit's grids stay symbolic)
            self.net.compile(fullgraph=True, dynamic=True)
        self._configured = True

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, r, r) -> logits (B, num_classes)."""
        return self.net(x)

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Model-side randomness (dropout, drop path, mixup) restarts from (seed, epoch, batch, rank) at each
        # batch, so a step runs the same whether or not training was resumed before it, also inside an epoch;
        # the data side is seeded per sample by training.datasets.EpochSampler. Unseeded runs (no
        # seed_everything) are left alone.
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            key = [int(seed), self.current_epoch, batch_idx, self.global_rank]
            state = np.random.SeedSequence(key).generate_state(2)
            batch_seed = int(state[0]) << 32 | int(state[1])
            random.seed(batch_seed)
            np.random.seed(int(state[0]))
            torch.manual_seed(batch_seed)

    def batch_resolution(self, batch_idx: int) -> int:
        """The resolution of a training batch: ``img_size``, or one of ``train_resolutions`` drawn by (seed,
        epoch, batch) (`vit.draw_image_size`): the same on every rank and again after a resume. With
        ``packing``, ``batch_idx`` is the sample's index in the epoch: one size per image."""
        if self.train_resolutions is None:
            return self.train_resolution
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return draw_image_size(self.train_resolutions, seed=seed, epoch=self.current_epoch, batch_index=batch_idx)

    def logits(self, x: Tensor) -> Tensor:
        """Images (B, C, r, r) -> logits, run packed with ``packing`` (the same numbers up to rounding)."""
        return self.net.forward_packed(list(x)) if self.packing else self(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        target = y
        if self.mixup is not None:  # on the augmented batch, before any resize
            x, target = self.mixup(x, y)
        if self.packing:  # one size per image, one packed sequence
            sizes = [self.batch_resolution(batch_idx * len(x) + i) for i in range(len(x))]
            logits = self.net.forward_packed([resize(image[None], size)[0] for image, size in zip(x, sizes)])
        else:  # the augmented batch, resized as a whole
            logits = self(resize(x, self.batch_resolution(batch_idx)))
        loss = self.criterion(logits, target)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over data-parallel ranks
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.logits(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.val_metrics.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def on_test_start(self) -> None:
        loaders = self.trainer.test_dataloaders
        n = len(loaders) if isinstance(loaders, list) else 1
        if n != len(self.eval_keys):
            raise ValueError(
                f"got {n} test dataloaders for eval_protocols={self.eval_protocols} x eval_resolutions="
                f"{self.eval_resolutions}; give the datamodule the same lists (train.py links them from the model)"
            )

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        (protocol, resolution), metrics = self.eval_keys[dataloader_idx], self.test_metrics[dataloader_idx]
        metrics.update(self.logits(x), y)
        self.test_samples[dataloader_idx] += y.shape[0]
        self.log_dict(
            {f"test/{protocol}/{name}@{resolution}": m for name, m in metrics.items()}, add_dataloader_idx=False
        )

    def on_test_epoch_end(self) -> None:
        self.eval_results = {
            key: {name: float(v) for name, v in metrics.compute().items()}
            for key, metrics in zip(self.eval_keys, self.test_metrics)
        }

    def on_test_end(self) -> None:
        log_dir = self.trainer.log_dir  # a broadcast under DDP / FSDP: every rank must ask
        if not self.trainer.is_global_zero:
            return
        meta = {
            "checkpoint": self.trainer.ckpt_path,
            "train_resolution": self.train_resolution,
            "patch_size": self.patch_size,
            "resolution_mode": self.resolution_mode,
            "attn_logit_scale": self.attn_logit_scale,
            "test_samples": self.test_samples[0],
            "num_params": sum(p.numel() for p in self.net.parameters()),
        }
        print(format_eval_table(self.eval_results, self.patch_size, self.train_resolution))
        paths = write_eval_report(log_dir, self.eval_results, meta)
        print(f"wrote {', '.join(os.fspath(p) for p in paths)}")

    def configure_optimizers(self) -> dict[str, Any]:
        no_decay = self.net.no_weight_decay()
        groups = param_groups_weight_decay(self.net, self.hparams.weight_decay, no_weight_decay_list=no_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        steps_per_epoch = max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)
        warmup = min(total, round(self.hparams.warmup_epochs * steps_per_epoch))
        ratio = self.hparams.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
