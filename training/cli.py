"""`ViTCLI`: LightningCLI with the project's defaults (run folder layout, auto precision, linked arguments).

A run folder (``--trainer.default_root_dir``, default runs/default) holds::

    config.yaml                    resolved fit config (rerun, resume or test with --config)
    events.out.tfevents.*          TensorBoard log (continues across resumes)
    csv/version_N/metrics.csv      CSV log, one version per start of `fit`
    checkpoints/best.ckpt          best val/top1
    checkpoints/last.ckpt          end of the latest epoch (`--ckpt_path last` resumes from it)
    test/eval.json, test/eval.csv  accuracy per evaluation resolution (+ test/metrics.csv);
                                   test-<mode>/ when --model.resolution_mode is given
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .data import ImageDataModule
from .module import ImageClassifier


class SaveFitConfig(SaveConfigCallback):
    """Save config.yaml for ``fit`` only, so ``test --config run/config.yaml`` never rewrites it."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def auto_precision(accelerator: Any) -> str:
    """bf16-mixed when training will run on a CUDA GPU that supports bf16, else 32-true."""
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


class ViTCLI(LightningCLI):
    """LightningCLI for `ImageClassifier` + any `ImageDataModule` subclass.

    Links: the data's ``img_size``, ``num_classes`` and ``in_chans`` configure ``model.net``;
    ``model.eval_resolutions`` also sets the data's test resolutions; checkpoints go to
    ``<default_root_dir>/checkpoints``. ``trainer.precision`` left unset means `auto_precision`;
    ``trainer.logger`` left unset means the run folder layout above.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Two checkpoint callbacks: Lightning's save_last only saves when the monitored metric improved.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "trainer.default_root_dir": "runs/default",
                "checkpoint.filename": "best",
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.enable_version_counter": False,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )
        for group in ("checkpoint", "last_checkpoint"):
            parser.link_arguments("trainer.default_root_dir", f"{group}.dirpath", compute_fn=checkpoint_dir)
        parser.link_arguments("data.init_args.img_size", "model.net.img_size")
        parser.link_arguments("model.eval_resolutions", "data.init_args.eval_resolutions")
        parser.link_arguments("data.num_classes", "model.net.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.net.in_chans", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        # jsonargparse wraps an error raised while building the data or model (missing dataset, bad
        # resolution) in a "Does not validate against any of the Union subtypes" ValueError; show the original.
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = error.__cause__ or error.__context__
            if isinstance(cause, (FileNotFoundError, ValueError)):
                raise cause from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("precision") is None:
            kwargs["precision"] = auto_precision(config.get("accelerator", "auto"))
        if config.get("logger") is None:
            root = os.fspath(config["default_root_dir"])
            if self.subcommand in (None, "fit"):
                # TensorBoard first: it sets trainer.log_dir (config.yaml) to the run folder itself.
                kwargs["logger"] = [
                    TensorBoardLogger(root, name="", version="", default_hp_metric=False),
                    CSVLogger(root, name="csv"),
                ]
            else:
                mode = self.model.resolution_mode
                kwargs["logger"] = CSVLogger(root, name="", version=self.subcommand + (f"-{mode}" if mode else ""))
        return super().instantiate_trainer(**kwargs)


def checkpoint_dir(default_root_dir: str | os.PathLike) -> str:
    """``<default_root_dir>/checkpoints``."""
    return os.path.join(os.fspath(default_root_dir), "checkpoints")


def cli_main(args: ArgsType = None, run: bool = True) -> ViTCLI:
    """``python train.py {fit,validate,test} --config configs/<name>.yaml [--section.option value ...]``."""
    return ViTCLI(
        ImageClassifier,
        ImageDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveFitConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
