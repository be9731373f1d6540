"""`ViTCLI`: the LightningCLI of train.py, with ``fit`` / ``validate`` / ``test`` / ``predict``.

A run folder (``--trainer.default_root_dir``, default runs/default) holds::

    config.yaml                    resolved fit config (rerun, resume or test with --config)
    .lock                          exists while a process trains or tests here (one at a time)
    tensorboard/version_N/         TensorBoard log, one version per start of `fit` (a resume is a start)
    csv/version_N/metrics.csv      CSV log, one version per start of `fit`
    checkpoints/best.ckpt          best val/top1 on the validation hold-out (never the test split)
    checkpoints/last.ckpt          where `--ckpt_path last` resumes: saved at epoch ends, every 5 minutes, on
                                   SIGTERM / Ctrl-C and at the end (`training.checkpoint.LastCheckpoint`)
    checkpoints/fit_completed.json written when a fit ran to its end (`training.checkpoint.fit_completed`)
    test/eval.json, test/eval.csv  accuracy per (protocol, resolution) (+ test/metrics.csv);
                                   test-<mode>[-<scale>]/ when --model.resolution_mode or
                                   --model.attn_logit_scale is given (`training.module.eval_folder`)

Safety rules enforced here (a clear error instead of a silent wrong result): ``test`` / ``validate`` /
``predict`` need ``--ckpt_path`` (and ``last`` needs the run folder's last.ckpt); a checkpoint is read
safely and must have been trained with the same model and data arguments as the config (``fit --ckpt_path``
resumes only the run it belongs to); checkpoints are written atomically
(`training.checkpoint.AtomicCheckpointIO`); a run folder is locked while in use, and must be a folder. A
process stopped by SIGTERM or Ctrl-C exits non-zero (a fit after saving last.ckpt); a fit that stops on its
``max_steps`` inside an epoch is validated there (`ValidateFinalStep`), so best.ckpt exists.
Everything here goes through LightningCLI's public methods; the study (`training.study`) runs this CLI
in subprocesses and is not part of it.
"""

from __future__ import annotations

import ctypes
import difflib
import importlib
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint import AtomicCheckpointIO, LastCheckpoint, RunFolderLock, check_folder, checkpoint_dir, read_checkpoint
from .data import ImageDataModule
from .module import ImageClassifier, eval_folder


class SaveFitConfig(SaveConfigCallback):
    """Save ``<default_root_dir>/config.yaml`` for ``fit`` only, so ``test --config run/config.yaml`` never rewrites
    it; in the run folder itself, not in a logger's version folder (``save_to_log_dir=False``)."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, os.fspath(path), skip_unset=False, overwrite=True, multifile=self.multifile)


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


class ReleaseWhenDone(Callback):
    """Releases a `RunFolderLock` when the trainer's fit / test / ... ends, normally or by an exception."""

    def __init__(self, lock: RunFolderLock) -> None:
        self.lock = lock

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.lock.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.lock.release()


class ValidateFinalStep(Callback):
    """Validate after the step that reaches ``max_steps`` inside an epoch, as at an epoch end, so a step budget
    shorter than an epoch still ends with val metrics and best.ckpt: it asks the trainer to stop there, and
    Lightning validates before a requested stop."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class ViTCLI(LightningCLI):
    """LightningCLI for `ImageClassifier` + any `ImageDataModule` subclass.

    Links: the data's ``img_size``, ``num_classes`` and ``in_chans`` configure ``model.net``;
    ``model.eval_resolutions`` / ``model.eval_protocols`` also set the data's test loaders;
    checkpoints go to ``<default_root_dir>/checkpoints``. ``trainer.precision`` left unset means
    `auto_precision`; ``trainer.logger`` left unset means the run folder layout above.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Every subcommand's parser has the trainer / model / data keys: the first is kept to suggest a known key.
        self.keys_parser = getattr(self, "keys_parser", None) or parser
        parser.add_argument(
            "--threads", type=PositiveInt | None, default=None,
            help="torch CPU threads of this process (torch.set_num_threads); null: torch's default (OMP_NUM_THREADS, "
                 "else one per core). configs/fashion_mnist.yaml sets 1: fastest on 2 shared cores (README)",
        )
        # best.ckpt by Lightning's ModelCheckpoint; last.ckpt by LastCheckpoint, which also saves inside epochs
        # and on signals and marks a completed fit (Lightning's save_last only saves when the metric improved).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "trainer.default_root_dir": "runs/default",
                "checkpoint.filename": "best",
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.enable_version_counter": False,
            }
        )
        for group in ("checkpoint", "last_checkpoint"):
            parser.link_arguments("trainer.default_root_dir", f"{group}.dirpath", compute_fn=checkpoint_dir)
        parser.link_arguments("data.init_args.img_size", "model.net.init_args.img_size")
        parser.link_arguments("model.eval_resolutions", "data.init_args.eval_resolutions")
        parser.link_arguments("model.eval_protocols", "data.init_args.eval_protocols")
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.net.init_args.in_chans", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:  # the parsers do not exit themselves (`cli_main`: exit_on_error=False)
            given = sys.argv[1:] if args is None else [str(a) for a in args] if isinstance(args, (list, tuple)) else []
            subcommand = next((a for a in given if a in self.subcommands()), None)
            command = " ".join(filter(None, [os.path.basename(sys.argv[0]) or "train.py", subcommand]))
            print(f"{command}: error: {explain_parse_error(str(error), given, self.keys_parser)}\n"
                  f"(`{command} --help` lists every option)", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        # Checked here, before anything is built: right after parsing, LightningCLI loads a checkpoint's model
        # hyperparameters over the config (and so would silently rebuild whatever architecture the checkpoint
        # holds). The config decides; a checkpoint trained with other model/data arguments is refused.
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            check_folder(self.config[subcommand]["trainer"]["default_root_dir"], "--trainer.default_root_dir")
            check_ckpt_path(parser, self.config)

    def before_instantiate_classes(self) -> None:
        threads = (self.config[self.subcommand] if self.subcommand else self.config).get("threads")
        if threads is not None:
            torch.set_num_threads(threads)

    def instantiate_classes(self) -> None:
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
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        if config.get("precision") is None:
            kwargs["precision"] = auto_precision(config.get("accelerator", "auto"))
        if not config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        root = os.fspath(config["default_root_dir"])
        if config.get("logger") is None:
            if self.subcommand in (None, "fit"):
                # A version folder per start, so that two fits into one folder (or a fit and its resume) never
                # write into one TensorBoard run.
                kwargs["logger"] = [
                    TensorBoardLogger(root, name="tensorboard", default_hp_metric=False),
                    CSVLogger(root, name="csv"),
                ]
            else:
                version = eval_folder(self.subcommand, self.model.resolution_mode, self.model.attn_logit_scale)
                kwargs["logger"] = CSVLogger(root, name="", version=version)
        # DDP workers (LOCAL_RANK > 0) are children of the locking process and share its folder.
        if not self.subcommand or os.environ.get("LOCAL_RANK", "0") != "0":
            trainer = super().instantiate_trainer(**kwargs)
        else:
            lock = RunFolderLock(root, argument="--trainer.default_root_dir")
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except BaseException:
                lock.release()
                raise
            trainer.callbacks.append(ReleaseWhenDone(lock))
        trainer.callbacks.append(ValidateFinalStep())
        return trainer


def explain_parse_error(message: str, args: list[str], parser: ArgumentParser) -> str:
    """jsonargparse's ``message``, or for a key no parser accepts (a typo) one line: the key, the config file(s) in
    ``args`` that set it (else "on the command line") and the closest accepted key (known to ``parser``, or to the
    class a ``class_path`` names)."""
    unknown = (re.search(r"does not accept option '([^']+)'", message) or re.match(r"Option '([^']+)' is not accepted$",
               message) or re.match(r"unrecognized arguments: --([^\s=]+)", message))
    container = re.match(r'Parser key "([^"]+)":', message)
    in_class = re.search(r"class_path '([^']+)':\s+Option '([^']+)' is not accepted", message)
    if unknown:
        key = unknown.group(1)
        close = _close_key(key, [str(k) for k in parser.get_defaults().keys()])
    elif container and in_class:
        (class_path, name), container = in_class.groups(), container.group(1)
        key = f"{container}.init_args.{name}"
        module, _, attribute = class_path.rpartition(".")
        class_parser = ArgumentParser()
        class_parser.add_class_arguments(getattr(importlib.import_module(module), attribute))
        match = _close_key(name, [str(k) for k in class_parser.get_defaults().keys()])
        close = f"{container}.init_args.{match}" if match else None
    else:
        return message
    files = [path for path in _config_files(args) if _sets_key(path, key)]
    where = f"in {', '.join(files)}" if files else "on the command line"
    return f"unknown key '{key}' {where}" + (f"; did you mean '{close}'?" if close else "")


def _close_key(key: str, known: list[str]) -> str | None:
    """``key`` with its first unknown part replaced by the closest known one at that level (None if none is close)."""
    parts = key.split(".")
    prefixes = {".".join(k.split(".")[:n]) for k in known for n in range(1, len(k.split(".")) + 1)}
    for n in range(1, len(parts) + 1):
        prefix = ".".join(parts[:n])
        if prefix not in prefixes:
            parent = ".".join(parts[: n - 1])
            siblings = {p.split(".")[-1] for p in prefixes if p.count(".") == n - 1 and p.startswith(parent)
                        and (n == 1 or p[len(parent)] == ".")}
            match = difflib.get_close_matches(parts[n - 1], sorted(siblings), n=1, cutoff=0.6)
            return ".".join([*parts[: n - 1], match[0], *parts[n:]]) if match else None
    return None


def _config_files(args: list[str]) -> list[str]:
    """The files given with ``--config`` / ``-c`` in ``args``, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _sets_key(path: str, key: str) -> bool:
    """Whether the YAML file ``path`` sets the dotted ``key`` (with or without its ``init_args`` levels)."""
    try:
        node = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    for parts in (key.split("."), [p for p in key.split(".") if p != "init_args"]):
        here = node
        for part in parts:
            if not isinstance(here, dict) or part not in here:
                break
            here = here[part]
        else:
            return True
    return False


def check_ckpt_path(parser: LightningArgumentParser, config: Namespace) -> None:
    """ValueError when the parsed subcommand needs a checkpoint and has none, or when its ``--ckpt_path`` is not a
    usable checkpoint or was trained with other model/data arguments than ``config``."""
    subcommand = config["subcommand"]
    section = config[subcommand]
    ckpt_path = section.get("ckpt_path")
    if ckpt_path is None:
        if subcommand == "fit":
            return
        raise ValueError(
            f"`{subcommand}` needs --ckpt_path: the checkpoint to evaluate (e.g. <run>/checkpoints/last.ckpt, "
            "or 'last' / 'best' for the run folder's own); without it the weights would be random"
        )
    path = checkpoint_file(ckpt_path, section["trainer"]["default_root_dir"])
    if path is None:
        if ckpt_path == "last" and subcommand != "fit":
            missing = Path(checkpoint_dir(section["trainer"]["default_root_dir"])) / "last.ckpt"
            raise FileNotFoundError(
                f"`{subcommand} --ckpt_path last`: there is no {os.fspath(missing)!r} (the last.ckpt of "
                f"--trainer.default_root_dir={os.fspath(section['trainer']['default_root_dir'])!r}); train first, or "
                "give the checkpoint's path; without it the weights would be random"
            )
        return  # 'best' / 'hpc' / 'registry' / 'last' for a fit that starts: Lightning resolves these itself
    checkpoint = read_checkpoint(path)
    resolved = yaml.safe_load(parser.dump(config, skip_link_targets=False, skip_unset=False))[subcommand]
    problems = []
    for saved_key, config_key in (("hyper_parameters", "model"), ("datamodule_hyper_parameters", "data")):
        saved = dict(checkpoint.get(saved_key) or {})
        saved.pop("_instantiator", None)
        current = resolved.get(config_key) or {}
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


def checkpoint_file(ckpt_path: str, default_root_dir: str | os.PathLike) -> Path | None:
    """The file ``--ckpt_path`` names: ``last`` is the run folder's last.ckpt (None when there is none yet: fit
    starts from scratch); None for ``best`` / ``hpc`` / ``registry...``, which Lightning resolves itself."""
    if ckpt_path == "last":
        path = Path(checkpoint_dir(default_root_dir)) / "last.ckpt"
        return path if path.exists() else None
    if ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return None
    return Path(ckpt_path)


#: The pid a train.py process must not outlive (set by the study for each run); train.py puts its own pid here
#: for the DDP ranks Lightning starts from it, so that study, run and ranks die together (`die_with_parent`).
PARENT_PID_ENV = "TRAIN_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with(parent: int) -> None:
    """Linux: the kernel sends this process SIGKILL when its parent exits (PR_SET_PDEATHSIG, which a kill -9 of the
    parent cannot skip); if ``parent`` is gone already, exit now. Safe as a ``preexec_fn`` (no import, no lock)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent() -> None:
    """`die_with` the parent named by ``$TRAIN_DIE_WITH_PARENT`` (nothing when unset), and name this process there
    for the processes it starts: Lightning's DDP launcher starts ranks without a parent-death signal."""
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        die_with(int(parent))
        os.environ[PARENT_PID_ENV] = str(os.getpid())


#: Lightning's advert for its cloud logger, logged by every Trainer that has no LitLogger (lightning 2.6).
LIGHTNING_TIP = "try installing [litlogger]"
#: Warnings from the libraries under train.py that a user of train.py cannot act on, dropped at their source
#: (message regex, category, module regex of the line that warns). Each was seen in a `fit` or `test` here.
KNOWN_WARNINGS = (
    # torch 2.10+ deprecates LeafSpec, which lightning 2.6 still builds in its _pytree (once per fit and test)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return LIGHTNING_TIP not in record.getMessage()


def quiet_known_noise() -> None:
    """Drop Lightning's litlogger tip and the `KNOWN_WARNINGS`; everything else Lightning prints stays. Idempotent."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTip) for f in logger.filters):
            logger.addFilter(_DropLightningTip())


def cli_main(args: ArgsType = None, run: bool = True) -> ViTCLI:
    """``python train.py {fit,validate,test,predict} --config configs/<name>.yaml [--section.option value ...]``;
    with ``run=False`` (no subcommand in ``args``) it only builds the model, data and trainer.

    SIGTERM or Ctrl-C ends it with a non-zero status: a fit stops at the end of its step after saving last.ckpt
    (`training.checkpoint.LastCheckpoint`); Lightning would end the other subcommands with status 0.
    """
    die_with_parent()
    quiet_known_noise()
    try:
        return ViTCLI(
            ImageClassifier,
            ImageDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveFitConfig,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            # errors come back to `ViTCLI.parse_arguments`, which names the key, the file and a close match
            parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in ViTCLI.subcommands()}},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )
    except SIGTERMException:
        print("[train] stopped by SIGTERM", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
