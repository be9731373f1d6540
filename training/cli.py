"""`ViTCLI`: one LightningCLI for ``fit`` / ``validate`` / ``test`` / ``predict`` and the ``study``.

A run folder (``--trainer.default_root_dir``, default runs/default) holds::

    config.yaml                    resolved fit config (rerun, resume or test with --config)
    .lock                          held while a process trains or tests here (one at a time)
    events.out.tfevents.*          TensorBoard log (continues across resumes)
    csv/version_N/metrics.csv      CSV log, one version per start of `fit`
    checkpoints/best.ckpt          best val/top1 on the validation hold-out (never the test split)
    checkpoints/last.ckpt          end of the latest epoch (`--ckpt_path last` resumes from it)
    test/eval.json, test/eval.csv  accuracy per (protocol, resolution) (+ test/metrics.csv);
                                   test-<mode>/ when --model.resolution_mode is given

Safety rules enforced here (a clear error instead of a silent wrong result): ``test`` / ``validate``
need ``--ckpt_path``; a checkpoint is read safely and must have been trained with the same model and
data arguments as the config (``fit --ckpt_path`` resumes only the run it belongs to); checkpoints are
written atomically (`training.checkpoint.AtomicCheckpointIO`); a run folder is locked while in use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .checkpoint import AtomicCheckpointIO, RunFolderLock, read_checkpoint
from .data import ImageDataModule
from .module import ImageClassifier

STUDY = "study"


class SaveFitConfig(SaveConfigCallback):
    """Save config.yaml for ``fit`` only, so ``test --config run/config.yaml`` never rewrites it."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def auto_precision(accelerator: Any) -> str:
    """bf16-mixed when training will run on a CUDA GPU that supports bf16, else 32-true."""
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


#: Arguments that may differ between a checkpoint and the config that loads it: values filled in from the
#: data at instantiation, and data options that change how data is read or evaluated, not what is learned.
CKPT_FREE_KEYS = {
    "model.net.init_args.num_classes", "model.net.init_args.in_chans",
    "data.root", "data.download", "data.num_workers", "data.eval_batch_size", "data.eval_resolutions",
    "data.eval_protocols", "data.eval_crop_pct",
}
#: Data options that only shape training (free when testing, fixed when resuming a fit).
TRAINING_ONLY_DATA_KEYS = {
    "data.batch_size", "data.crop", "data.min_scale", "data.padding", "data.hflip", "data.randaugment_magnitude",
}


def _differences(saved: Any, current: Any, prefix: str, free: set[str] = frozenset()) -> list[str]:
    """Dotted keys whose values differ between two nested dicts (keys missing on one side or in ``free`` are
    skipped)."""
    if prefix in free:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in saved.keys() & current.keys():
            out += _differences(saved[key], current[key], f"{prefix}.{key}", free)
        return sorted(out)
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r}, config {current!r}"]


class ViTCLI(LightningCLI):
    """LightningCLI for `ImageClassifier` + any `ImageDataModule` subclass, plus the ``study`` subcommand.

    Links: the data's ``img_size``, ``num_classes`` and ``in_chans`` configure ``model.net``;
    ``model.eval_resolutions`` / ``model.eval_protocols`` also set the data's test loaders;
    checkpoints go to ``<default_root_dir>/checkpoints``. ``trainer.precision`` left unset means
    `auto_precision`; ``trainer.logger`` left unset means the run folder layout above.
    ``study`` takes the arguments of `training.study.run_study` (``--config study_*.yaml``), and fit
    options for every run after ``--``.
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
        parser.link_arguments("data.init_args.img_size", "model.net.init_args.img_size")
        parser.link_arguments("model.eval_resolutions", "data.init_args.eval_resolutions")
        parser.link_arguments("model.eval_protocols", "data.init_args.eval_protocols")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.net.init_args.in_chans", apply_on="instantiate")

    # ------------------------------------------------------------------ the study subcommand

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        from .study import add_study_arguments

        study_parser = self.init_parser(**kwargs.get(STUDY, {}))
        # init_parser gives it --config (a study config, configs/study_*.yaml)
        self._subcommand_method_arguments[STUDY] = add_study_arguments(study_parser)
        self._subcommand_parsers[STUDY] = study_parser
        parser._subcommands_action.add_subcommand(
            STUDY, study_parser, help="Train every variant x seed, test everywhere, write the study report."
        )

    def _set_seed(self) -> None:
        if self.config.get("subcommand") != STUDY:  # each run of the study seeds itself
            super()._set_seed()

    def _parse_ckpt_path(self) -> None:
        # Replaces Lightning's, which loads the checkpoint's hyperparameters over the config and so silently
        # rebuilds whatever architecture the checkpoint holds. Here the config decides, and a checkpoint that
        # was trained with other model/data arguments is refused.
        subcommand = self.config.get("subcommand")
        if subcommand in (None, STUDY):
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if ckpt_path is None:
            if subcommand == "fit":
                return
            raise ValueError(
                f"`{subcommand}` needs --ckpt_path: the checkpoint to evaluate (e.g. <run>/checkpoints/last.ckpt, "
                "or 'last' / 'best' for the run folder's own); without it the weights would be random"
            )
        path = self._resolve_ckpt_path(section, ckpt_path)
        if path is None:
            return  # 'best' / 'hpc' / 'registry': Lightning resolves and checks these itself
        checkpoint = read_checkpoint(path)
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))[subcommand]
        problems = []
        for saved_key, config_key in (("hyper_parameters", "model"), ("datamodule_hyper_parameters", "data")):
            saved = dict(checkpoint.get(saved_key) or {})
            saved.pop("_instantiator", None)
            current = dump.get(config_key) or {}
            if config_key == "data" and isinstance(current, dict) and "class_path" in current:
                if saved.get("_class_path", current["class_path"]) != current["class_path"]:
                    problems.append(f"data: checkpoint {saved['_class_path']!r}, config {current['class_path']!r}")
                current = current.get("init_args") or {}
            saved.pop("_class_path", None)
            free = CKPT_FREE_KEYS if subcommand == "fit" else CKPT_FREE_KEYS | TRAINING_ONLY_DATA_KEYS
            problems += _differences(saved, current, config_key, free)
        if problems:
            raise ValueError(
                f"ckpt_path={os.fspath(path)!r} was trained with other arguments than this config:\n  "
                + "\n  ".join(problems)
                + "\nUse the run's own config.yaml (`--config <run>/config.yaml`) or the matching checkpoint."
            )

    def _resolve_ckpt_path(self, section: Any, ckpt_path: str) -> Path | None:
        if ckpt_path == "last":
            path = Path(checkpoint_dir(section["trainer"]["default_root_dir"])) / "last.ckpt"
            return path if path.exists() else None  # Lightning starts from scratch (with a warning) if missing
        if ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
            return None
        return Path(ckpt_path)

    # ------------------------------------------------------------------ instantiation and running

    def instantiate_classes(self) -> None:
        if self.subcommand == STUDY:
            return  # the study builds its runs' models itself (and checks them before training)
        # jsonargparse wraps an error raised while building the data or model (missing dataset, bad
        # resolution) in a "Does not validate against any of the Union subtypes" ValueError; show the original.
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = error.__cause__ or error.__context__
            if isinstance(cause, (FileNotFoundError, ValueError, TypeError)):
                raise cause from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("precision") is None:
            kwargs["precision"] = auto_precision(config.get("accelerator", "auto"))
        if not config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        root = os.fspath(config["default_root_dir"])
        if config.get("logger") is None:
            if self.subcommand in (None, "fit"):
                # TensorBoard first: it sets trainer.log_dir (config.yaml) to the run folder itself.
                kwargs["logger"] = [
                    TensorBoardLogger(root, name="", version="", default_hp_metric=False),
                    CSVLogger(root, name="csv"),
                ]
            else:
                mode = self.model.resolution_mode
                kwargs["logger"] = CSVLogger(root, name="", version=self.subcommand + (f"-{mode}" if mode else ""))
        if self.subcommand is not None and os.environ.get("LOCAL_RANK", "0") == "0":
            # DDP workers (LOCAL_RANK > 0) are children of the locking process and share its folder.
            self.run_folder_lock = RunFolderLock(root)
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand != STUDY:
            try:
                return super()._run_subcommand(subcommand)
            finally:
                lock = getattr(self, "run_folder_lock", None)
                if lock is not None:
                    lock.release()
        from .study import run_study

        config = self._subcommand_parsers[STUDY].instantiate_classes(self.config[STUDY])
        run_study(**{k: v for k, v in config.items() if k in self._subcommand_method_arguments[STUDY]})


def checkpoint_dir(default_root_dir: str | os.PathLike) -> str:
    """``<default_root_dir>/checkpoints``."""
    return os.path.join(os.fspath(default_root_dir), "checkpoints")


def cli_main(args: ArgsType = None, run: bool = True) -> ViTCLI:
    """``python train.py {fit,validate,test,predict,study} --config configs/<name>.yaml [--section.option value ...]``."""
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
