"""train.py / training.cli / training.module: fit, test at several resolutions, resume, DDP, bad input.

Everything runs the real CLI (in-process unless it needs a fresh interpreter) on the tiny datasets
from tests/test_data.py, with a one-block 32-wide ViT.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from interruptions import CrashAtStep, SignalAtStep
from lightning.pytorch import Callback, LightningModule, Trainer
from test_data import CONFIGS, QUIET, TINY_NET, accept_fake_cifar, smoke_args

import training.files
import training.report
import vit
from training.checkpoint import RunFolderLock, fit_completed
from training.cli import auto_precision, cli_main
from training.data import FashionMNISTData
from training.module import ImageClassifier
from training.transforms import eval_transform

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cifar_checksums(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accept_fake_cifar(monkeypatch, data / "cifar")


def fashion_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """fit/test arguments for a tiny Fashion-MNIST run: 64 train images, batch 16 (4 steps per epoch)."""
    return [
        "--config", str(CONFIGS / "fashion_mnist.yaml"), f"--data.root={data / 'fashion'}",
        "--data.batch_size=16", f"--trainer.default_root_dir={run_dir}", "--trainer.max_epochs=1",
        *TINY_NET, *QUIET, *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of every csv/version_N/metrics.csv of a run, in order."""
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def val_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """{epoch: {"val/top1": ..., "val/loss": ...}} from the CSV logs."""
    rows = [r for r in read_metrics(run_dir) if r.get("val/top1")]
    return {int(r["epoch"]): {k: float(v) for k, v in r.items() if k.startswith("val/") and v} for r in rows}


# ----------------------------------------------------------------------------- fit and test


NET = "--model.net=vit.NDRopeVisionTransformer"
DATASETS = {
    "fashion_mnist": ["--data=training.data.FashionMNISTData", "--data.root={root}/fashion", "--data.img_size=28"],
    "cifar10": ["--data=training.data.CIFAR10Data", "--data.root={root}/cifar"],
    "cifar100": ["--data=training.data.CIFAR100Data", "--data.root={root}/cifar"],
    "image_folder": ["--data=training.data.ImageFolderData", "--data.root={root}/folder", "--data.img_size=16"],
}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_fit_few_steps(data: Path, tmp_path: Path, dataset: str) -> None:
    """Two optimizer steps on each dataset type leave the run folder layout with the right step count."""
    args = [a.format(root=data) for a in DATASETS[dataset]]
    cli = cli_main(
        ["fit", NET, *args, "--data.batch_size=4", "--data.num_workers=0", "--model.net.init_args.patch_size=4", *TINY_NET, *QUIET,
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
         f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.trainer.global_step == 2
    assert cli.model.net.num_classes == cli.datamodule.num_classes
    assert cli.model.net.in_chans == cli.datamodule.in_chans
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert "pos_embed: rope_mixed" in (tmp_path / "config.yaml").read_text()  # vit's default
    assert 0.0 <= val_rows(tmp_path)[0]["val/top1"] <= 1.0
    assert list(tmp_path.glob("tensorboard/version_0/events.out.tfevents.*"))


def test_multi_resolution_eval_matches_manual_evaluation(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`test` at 20/28/36px x zoom/canvas writes the table, eval.json and eval.csv; the numbers equal a plain loop."""
    cli_main(["fit", *fashion_args(data, tmp_path, "--trainer.limit_val_batches=1")])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    cli = cli_main(["test", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={ckpt}",
                    "--model.eval_resolutions=[20, 28, 36]", "--model.eval_protocols=[zoom, canvas]"])
    report = json.loads((tmp_path / "test" / "eval.json").read_text())
    keys = [(r["protocol"], r["resolution"]) for r in report["results"]]
    assert keys == [("zoom", 20), ("zoom", 28), ("zoom", 36), ("canvas", 20), ("canvas", 28), ("canvas", 36)]
    assert report["meta"]["train_resolution"] == 28 and report["meta"]["patch_size"] == 4
    with open(tmp_path / "test" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    from_csv = [(r["protocol"], int(r["resolution"]), float(r["top1"])) for r in rows]
    assert from_csv == [(r["protocol"], r["resolution"], r["top1"]) for r in report["results"]]
    printed = capsys.readouterr().out
    assert "| zoom | 36 | 9x9 |" in printed and "| canvas | 28 (train) | 7x7 |" in printed

    net = cli.model.net.eval()
    net.load_state_dict({k[len("net."):]: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()})
    test_set = FashionMNISTData(root=str(data / "fashion")).load(train=False)
    dm = cli.datamodule
    for record in report["results"]:
        tf = eval_transform(record["resolution"], dm.mean, dm.std, protocol=record["protocol"], train_resolution=28)
        x = torch.stack([tf(test_set[i][0]) for i in range(len(test_set))])
        y = torch.tensor([test_set[i][1] for i in range(len(test_set))])
        with torch.no_grad():
            expected = (net(x).argmax(-1) == y).float().mean().item()
        assert record["top1"] == pytest.approx(expected, abs=1e-6)
        assert "top5" not in record  # 10 classes: top-1 only
    by_key = {(r["protocol"], r["resolution"]): r["top1"] for r in report["results"]}
    assert by_key["zoom", 28] == by_key["canvas", 28]  # the protocols agree at the training resolution

    # Another resolution mode writes next to, not over, the default; the training grid is unaffected by it.
    cli_main(["test", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={ckpt}",
              "--model.eval_resolutions=[28, 36]", "--model.eval_protocols=[zoom]",
              "--model.resolution_mode=interpolate"])
    interpolated = json.loads((tmp_path / "test-interpolate" / "eval.json").read_text())
    assert interpolated["meta"]["resolution_mode"] == "interpolate"
    assert interpolated["results"][0] == report["results"][1]  # 28px, identical
    assert json.loads((tmp_path / "test" / "eval.json").read_text()) == report
    # So does the attention-entropy scale: its own folder, the unscaled results untouched
    cli_main(["test", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={ckpt}",
              "--model.eval_resolutions=[28, 36]", "--model.eval_protocols=[zoom]",
              "--model.resolution_mode=interpolate", "--model.attn_logit_scale=log-length"])
    scaled = json.loads((tmp_path / "test-interpolate-log-length" / "eval.json").read_text())
    assert scaled["meta"]["attn_logit_scale"] == "log-length"
    assert scaled["results"][0] == report["results"][1]  # the identity at the training size
    assert json.loads((tmp_path / "test-interpolate" / "eval.json").read_text()) == interpolated


def test_fit_validates_on_the_hold_out_never_the_test_split(data: Path, tmp_path: Path) -> None:
    """best.ckpt is chosen on val/top1, computed on the 10% hold-out of the training split; fit never loads test."""
    cli = cli_main(["fit", *fashion_args(data, tmp_path)])
    dm = cli.datamodule
    assert dm.test_set is None
    val_loader = cli.trainer.val_dataloaders
    assert val_loader.dataset.base is dm.val_set and len(dm.val_set) == 6
    assert not set(dm.val_set.indices) & set(dm.train_set.indices)
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)
    states = [v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert any(v["monitor"] == "val/top1" and v["best_model_path"].endswith("best.ckpt") for v in states)


def test_top5_with_more_than_ten_classes(data: Path, tmp_path: Path) -> None:
    cli_main(["fit", NET, "--data=training.data.CIFAR100Data", f"--data.root={data / 'cifar'}", "--data.batch_size=8",
              "--data.num_workers=0", "--model.net.init_args.patch_size=4", *TINY_NET, *QUIET, "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
              f"--trainer.default_root_dir={tmp_path}"])
    cli_main(["test", "--config", str(tmp_path / "config.yaml"),
              f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "--model.eval_resolutions=[16, 32]"])
    results = json.loads((tmp_path / "test" / "eval.json").read_text())["results"]
    assert [r["resolution"] for r in results] == [16, 32]
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in results)


def test_net_is_a_hyperparameter_only_as_a_config(data: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """From the CLI, checkpoints record the net's class_path/init_args (the architecture the checkpoint check
    compares); a net built in Python is no hyperparameter (its weights are in the state dict), without a warning."""
    net = vit.NDRopeVisionTransformer("learned", img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                         num_heads=2)
    model = ImageClassifier(net, lr=3e-3, eval_resolutions=[28, 36])
    assert dict(model.hparams) == {"lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 5.0, "min_lr_ratio": 0.01,
                                   "label_smoothing": 0.1, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
                                   "train_resolutions": None, "packing": False}
    assert dict(model.hparams_initial) == dict(model.hparams)
    assert not [w for w in recwarn if "nn.Module" in str(w.message)]

    cli = cli_main(fashion_args(data, tmp_path, "--trainer.max_epochs=1"), run=False)
    saved = cli.model.hparams
    assert saved["net"]["class_path"] == "vit.NDRopeVisionTransformer"
    assert saved["net"]["init_args"]["pos_embed"] == "rope_axial" and saved["net"]["init_args"]["embed_dim"] == 32
    assert not {"eval_resolutions", "eval_protocols", "resolution_mode", "attn_logit_scale", "compile"} & set(saved)


def test_attn_logit_scale_is_an_evaluation_switch_of_the_net(data: Path, tmp_path: Path) -> None:
    """--model.attn_logit_scale reaches the net, never the checkpoint's hyperparameters; the net's own
    setting from YAML (model.net.init_args.attn_logit_scale) stays unless the module's is given."""
    cli = cli_main(fashion_args(data, tmp_path, "--model.attn_logit_scale=log-length"), run=False)
    assert cli.model.net.attn_logit_scale == "log-length" and "attn_logit_scale" not in cli.model.hparams
    cli = cli_main(fashion_args(data, tmp_path, "--model.net.init_args.attn_logit_scale=log-length"), run=False)
    assert cli.model.net.attn_logit_scale == "log-length"
    net = vit.NDRopeVisionTransformer("learned", img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                                      depth=1, num_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"attn_logit_scale='log_length' is not supported; choose one of \['none', 'log-length'\]"):
        ImageClassifier(net, attn_logit_scale="log_length")
    timm_net = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10)
    with pytest.raises(TypeError, match="attn_logit_scale='log-length' needs a net with set_attn_logit_scale"):
        ImageClassifier(timm_net, attn_logit_scale="log-length")


def test_fit_output_has_lightnings_lines_without_its_advert_or_known_warnings(
    data: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """Lightning's own lines stay (devices, ...); its litlogger "Tip" and the deprecation warnings of
    `training.cli.KNOWN_WARNINGS` (torch's LeafSpec, from lightning's _pytree) are dropped at their source."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        cli_main(["fit", *fashion_args(data, tmp_path)])
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert any(m.startswith("GPU available") for m in messages), messages
    assert not [m for m in messages if "litlogger" in m]
    assert not [str(w.message) for w in recwarn if "LeafSpec" in str(w.message)]


def test_threads_sets_torch_cpu_threads(data: Path, tmp_path: Path) -> None:
    """``--threads`` (configs/fashion_mnist.yaml: 1) sets torch's CPU threads; null leaves torch's own choice."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cli_main(fashion_args(data, tmp_path), run=False)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        cli_main(fashion_args(data, tmp_path, "--threads=null"), run=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_each_start_of_fit_logs_to_its_own_tensorboard_version(data: Path, tmp_path: Path) -> None:
    """Two fits into one folder (here a fit and its resume) never write into one TensorBoard run; config.yaml
    stays in the run folder itself (it used to mix both starts' events in the folder)."""
    cli_main(["fit", *fashion_args(data, tmp_path)])
    cli_main(["fit", *fashion_args(data, tmp_path, "--trainer.max_epochs=2"), "--ckpt_path=last"])
    board = tmp_path / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["version_0", "version_1"]
    assert [len(list((board / v).glob("events.out.tfevents.*"))) for v in ("version_0", "version_1")] == [1, 1]
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert "max_epochs: 2" in (tmp_path / "config.yaml").read_text()


def test_precision_is_auto() -> None:
    """Unset precision means bf16-mixed on a CUDA GPU, 32-true on CPU."""
    expected = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    assert auto_precision("auto") == expected
    assert auto_precision("cpu") == "32-true"


def test_ema_weights_are_checkpointed(data: Path, tmp_path: Path) -> None:
    """With Lightning's EMAWeightAveraging callback the checkpoint holds the averaged weights."""
    cli_main(["fit", *fashion_args(data, tmp_path, "--trainer.limit_val_batches=1",
                                   "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
                                   "--trainer.callbacks.decay=0.5")])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    ema, current = ckpt["state_dict"], ckpt["current_model_state"]
    diff = max((ema[k] - current[k]).abs().max().item() for k in ema if k.startswith("net."))
    assert diff > 1e-6


# ----------------------------------------------------------------------------- resume


class StopAfterFirstEpoch(Callback):
    """Simulates an interruption: stop once epoch 0 (and its checkpoint) is done."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.should_stop = True


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_continues_exactly(data: Path, tmp_path: Path, num_workers: int) -> None:
    """2 epochs straight == 1 epoch, stop, `--ckpt_path last` for the 2nd: same metrics and weights.

    Augmentation, drop path and mixup are on, so any randomness that resuming replays differently shows.
    """
    extra = ["--trainer.max_epochs=2", "--model.net.init_args.drop_path_rate=0.2", "--model.mixup_alpha=0.8",
             "--model.cutmix_alpha=1.0", "--data.randaugment_magnitude=9", "--trainer.limit_val_batches=1",
             f"--data.num_workers={num_workers}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_main(["fit", *fashion_args(data, straight, *extra)])

    first = cli_main(fashion_args(data, resumed, *extra), run=False)
    first.trainer.callbacks.append(StopAfterFirstEpoch())
    first.trainer.fit(first.model, datamodule=first.datamodule)
    assert first.trainer.current_epoch == 1 and first.trainer.global_step == 3  # 58 training images, batch 16
    cli_main(["fit", *fashion_args(data, resumed, *extra), "--ckpt_path=last"])

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 6)
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert val_rows(resumed)[1] == pytest.approx(val_rows(straight)[1], abs=1e-6)


def assert_same_training(a_dir: Path, b_dir: Path, epoch_and_step: tuple[int, int]) -> None:
    """The last.ckpt of two runs: same epoch and step, same weights; and the same val metrics at every epoch."""
    a = torch.load(a_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(b_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == epoch_and_step
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, atol=1e-6, rtol=1e-5, msg=name)
    straight_val, resumed_val = val_rows(a_dir), val_rows(b_dir)
    assert sorted(resumed_val) == sorted(straight_val)
    for epoch, metrics in straight_val.items():
        assert resumed_val[epoch] == pytest.approx(metrics, abs=1e-6)


#: Randomness on every side (augmentation, drop path, mixup/cutmix), so a resume that replays any of it
#: differently shows; batch 8: 7 steps per epoch.
RANDOM_TRAINING = ["--data.batch_size=8", "--trainer.max_epochs=2", "--model.net.init_args.drop_path_rate=0.2",
                   "--model.mixup_alpha=0.8", "--model.cutmix_alpha=1.0", "--data.randaugment_magnitude=9",
                   "--model.train_resolutions=[20, 28, 36]",  # multi-resolution training: drawn per batch
                   "--trainer.limit_val_batches=1", "--data.num_workers=0"]


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of RANDOM_TRAINING without interruption (module scope: a class-scoped fixture method is deprecated)."""
    run = tmp_path_factory.mktemp("straight")
    cli_main(["fit", *fashion_args(data, run, *RANDOM_TRAINING)])
    return run


class TestResumeInsideAnEpoch:
    """An interruption in the middle of epoch 0, then `--ckpt_path last`: the run ends as if never stopped."""

    @pytest.mark.parametrize("interruption, saved_step, workers", [
        (SignalAtStep(3, signal.SIGINT), 4, 0),  # Ctrl-C during step 4: that step ends, then last.ckpt
        (CrashAtStep(5), 5, 0),  # killed without a word: the timed save after step 5 is what is left
        pytest.param(SignalAtStep(3, signal.SIGINT), 4, 2, marks=pytest.mark.slow),  # vs. a straight run without
    ], ids=["ctrl-c", "crash-after-timed-save", "ctrl-c-2-workers"])  # SIGTERM: test_sigterm_stops_a_fit_...
    def test_continues_exactly(self, data: Path, tmp_path: Path, straight: Path, interruption: Callback,
                               saved_step: int, workers: int) -> None:
        args = fashion_args(data, tmp_path, *RANDOM_TRAINING, f"--data.num_workers={workers}")
        timed = ["--last_checkpoint.every_n_minutes=1e-9"] if isinstance(interruption, CrashAtStep) else []
        first = cli_main([*args, *timed], run=False)
        first.trainer.callbacks.append(interruption)
        expected = (SystemExit, RuntimeError) if isinstance(interruption, CrashAtStep) else SystemExit
        with pytest.raises(expected) as stopped:
            first.trainer.fit(first.model, datamodule=first.datamodule)
        if isinstance(interruption, SignalAtStep):
            assert stopped.value.code == 128 + interruption.signum  # never 0: the fit did not finish
        saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert (saved["epoch"], saved["global_step"]) == (0, saved_step)  # inside epoch 0 (7 steps)
        assert saved["FashionMNISTData"] == {"epoch": 0, "batch": saved_step}
        assert not fit_completed(tmp_path)

        resumed = cli_main(["fit", *args, "--ckpt_path=last"])
        assert resumed.trainer.global_step == 14 and fit_completed(tmp_path)
        assert_same_training(straight, tmp_path, (1, 14))


def test_sigterm_stops_a_fit_non_zero_with_a_resumable_checkpoint(data: Path, tmp_path: Path) -> None:
    """`kill <fit>` (a scheduler's preemption, `timeout`) in the middle of an epoch: the step under way ends,
    last.ckpt is saved there and the process exits with status 143; the fit is not complete. `--ckpt_path last`
    then finishes it (its max_steps=10 inside the first, 14-step epoch) as if it had never stopped."""
    run, paused = tmp_path / "run", tmp_path / "signals"
    paused.mkdir()
    args = fashion_args(data, run, "--data.batch_size=4", "--trainer.max_steps=10", "--trainer.limit_val_batches=1")
    pause = ["--trainer.callbacks+=interruptions.PauseAtStep", "--trainer.callbacks.step=4",
             f"--trainer.callbacks.folder={paused}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", *args, *pause], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(paused.glob("paused-*")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        (paused / "go").touch()
        output = child.communicate(timeout=240)[0]
    finally:
        child.kill()
    assert child.returncode == 143, output[-3000:]
    assert "SIGTERM: stopping after this step" in output
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 5)
    assert not fit_completed(run)

    cli_main(["fit", *args, "--ckpt_path=last"])
    assert fit_completed(run)
    straight = tmp_path / "straight"
    cli_main(["fit", *fashion_args(data, straight, "--data.batch_size=4", "--trainer.max_steps=10",
                                   "--trainer.limit_val_batches=1")])
    assert_same_training(straight, run, (0, 10))


def test_step_budget_inside_an_epoch_validates_and_keeps_best(data: Path, tmp_path: Path) -> None:
    """max_steps=5 of a 14-step epoch: the fit validates after step 5 and writes best.ckpt, which `test` evaluates."""
    cli_main(["fit", *fashion_args(data, tmp_path, "--data.batch_size=4", "--trainer.max_steps=5",
                                   "--trainer.limit_val_batches=1")])
    assert [int(r["step"]) for r in read_metrics(tmp_path) if r.get("val/top1")] == [4]  # logged at the 5th step
    best = tmp_path / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["global_step"] == 5
    assert fit_completed(tmp_path)
    cli_main(["test", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={best}", "--model.eval_resolutions=[28]"])
    assert json.loads((tmp_path / "test" / "eval.json").read_text())["meta"]["checkpoint"] == str(best)


@pytest.mark.parametrize("every_n_train_steps, saved_step", [(2, 4), (None, None)])
def test_last_checkpoint_every_n_train_steps(data: Path, tmp_path: Path, every_n_train_steps: int | None,
                                             saved_step: int | None) -> None:
    """A crash at step 5 of a 14-step epoch leaves the save of step 4 with every_n_train_steps=2, and none with the
    step trigger off (the default timed save is 5 minutes away)."""
    args = fashion_args(data, tmp_path, "--data.batch_size=4", "--trainer.limit_val_batches=1")
    if every_n_train_steps:
        args.append(f"--last_checkpoint.every_n_train_steps={every_n_train_steps}")
    cli = cli_main(args, run=False)
    cli.trainer.callbacks.append(CrashAtStep(5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert (torch.load(last, weights_only=True)["global_step"] if last.exists() else None) == saved_step
    assert not fit_completed(tmp_path)


def test_fit_completed_needs_the_mark_and_the_checkpoint_it_marks(data: Path, tmp_path: Path) -> None:
    """The completion mark is written at the end of a fit, removed when the next fit in the folder starts, and
    only counts for the last.ckpt it was written with."""
    assert not fit_completed(tmp_path)
    args = fashion_args(data, tmp_path, "--trainer.limit_val_batches=1")
    cli_main(["fit", *args])
    mark = json.loads((tmp_path / "checkpoints" / "fit_completed.json").read_text())
    assert (mark["global_step"], mark["max_epochs"]) == (3, 1) and fit_completed(tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    kept = last.read_bytes()
    cli = cli_main([*args, "--trainer.max_epochs=2"], run=False)  # a longer fit in the same folder ...
    cli.trainer.callbacks.append(CrashAtStep(4))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
    assert not fit_completed(tmp_path)  # ... that did not finish
    cli_main(["fit", *args])
    assert fit_completed(tmp_path)
    last.write_bytes(kept[: len(kept) // 2])  # a last.ckpt that is not the one the mark was written for
    assert not fit_completed(tmp_path)


# ----------------------------------------------------------------------------- bad input and interruption


class TestBadInput:
    def test_resolution_not_multiple_of_patch(self, data: Path, tmp_path: Path) -> None:
        message = r"eval_resolutions=\[28, 30\]: \[30\] not a positive multiple of patch_size=4"
        with pytest.raises(ValueError, match=message):
            cli_main(["fit", *fashion_args(data, tmp_path, "--model.eval_resolutions=[28, 30]")])

    def test_unknown_pos_embed(self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        """The CLI's own type check: the key, the accepted values and the value given."""
        with pytest.raises(SystemExit):
            cli_main(["fit", *fashion_args(data, tmp_path, "--model.net.init_args.pos_embed=rope_bogus")])
        error = capsys.readouterr().err
        assert 'Parser key "pos_embed"' in error and "'rope_axial'" in error and "Got value: rope_bogus" in error

    def test_missing_dataset(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST not found.*apt-get install dataset-fashion-mnist"):
            cli_main(["fit", *fashion_args(tmp_path / "missing", tmp_path)])

    def test_run_folder_that_is_a_file(self, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """One error naming the option, before anything is built; it used to be a FileExistsError from the lock,
        followed by a second traceback from the half-built lock's destructor."""
        file = tmp_path / "run"
        file.write_text("notes\n")
        with pytest.raises(ValueError, match=rf"--trainer.default_root_dir='{file}' is a file, not a folder"):
            cli_main(["fit", *fashion_args(data, file)])
        with pytest.raises(ValueError, match=rf"default_root_dir='{file / 'sub'}' is inside '{file}', which is a file"):
            cli_main(["test", *fashion_args(data, file / "sub"), "--ckpt_path=x.ckpt"])
        unraisable = []
        monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
        with pytest.raises(ValueError, match=r"folder='.*run' is a file, not a folder"):
            RunFolderLock(file)
        gc.collect()
        assert unraisable == [] and file.read_text() == "notes\n"

    @pytest.mark.parametrize("right, typo, key, close", [
        ("  max_epochs: 3", "  max_epoch: 3", "trainer.max_epoch", "trainer.max_epochs"),
        ("pos_embed: rope_axial", "pos_embedd: rope_axial", "model.net.init_args.pos_embedd",
         "model.net.init_args.pos_embed"),
        ("batch_size: 128", "batch_sze: 128", "data.init_args.batch_sze", "data.init_args.batch_size"),
        ("\ntrainer:", "\ntrainr:", "trainr.default_root_dir", "trainer.default_root_dir"),
    ], ids=["trainer", "net", "data", "section"])
    def test_config_key_typo_names_key_file_and_close_match(self, data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture, right: str, typo: str,
                                                           key: str, close: str) -> None:
        """Two lines instead of a 76-line usage dump ending in "does not accept option" without the file."""
        config = tmp_path / "typo.yaml"
        config.write_text((CONFIGS / "fashion_mnist.yaml").read_text().replace(right, typo, 1))
        args = [str(config) if a == str(CONFIGS / "fashion_mnist.yaml") else a for a in fashion_args(data, tmp_path)]
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", *args])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-2:] == [
            f"{Path(sys.argv[0]).name} fit: error: unknown key '{key}' in {config}; did you mean '{close}'?",
            f"(`{Path(sys.argv[0]).name} fit --help` lists every option)"]

    def test_command_line_key_typo_names_a_close_match(self, data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
        with pytest.raises(SystemExit):
            cli_main(["fit", *fashion_args(data, tmp_path, "--model.lrr=0.1")])
        assert "error: unknown key 'model.lrr' on the command line; did you mean 'model.lr'?" in capsys.readouterr().err

    def test_threads_must_be_positive(self, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        with pytest.raises(SystemExit):
            cli_main(["fit", *fashion_args(data, tmp_path, "--threads=0")])
        assert 'Parser key "threads"' in capsys.readouterr().err

    @pytest.mark.parametrize("option, message", [
        ("--last_checkpoint.every_n_minutes=0", r"every_n_minutes=0.0 must be > 0, or None"),
        ("--last_checkpoint.every_n_train_steps=0", r"every_n_train_steps=0 must be a positive int, or None"),
    ])
    def test_bad_last_checkpoint_interval(self, data: Path, tmp_path: Path, option: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            cli_main(["fit", *fashion_args(data, tmp_path, option)])


def test_failed_checkpoint_write_keeps_previous(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies halfway (disk full) in epoch 2 leaves epoch 1's last.ckpt whole and no partial file."""
    extra = ["--trainer.max_epochs=2", "--trainer.limit_val_batches=1", "--checkpoint.save_top_k=0"]
    writes = {"n": 0}
    real_write_all = training.files._write_all

    def failing_write_all(fd: int, data: bytes) -> None:
        if len(data) > 10_000:  # a checkpoint
            writes["n"] += 1
            if writes["n"] > 1:  # the first checkpoint write is epoch 1's last.ckpt
                real_write_all(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(training.files, "_write_all", failing_write_all)
    with pytest.raises(OSError, match="No space left"):
        cli_main(["fit", *fashion_args(data, tmp_path, *extra)])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 3)
    with RunFolderLock(tmp_path):  # the failed fit released its run folder
        pass


class FillDiskBeforeSecondEpoch(Callback):
    """Fills the run folder's filesystem, leaving about half a checkpoint free, once epoch 1 is saved."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 1:
            size = (self.folder / "checkpoints" / "last.ckpt").stat().st_size
            free = shutil.disk_usage(self.folder).free
            with open(self.folder / "filler", "wb") as f:
                f.write(b"\0" * max(0, free - size // 2))


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Path:
    """A 4 MiB tmpfs (a real filesystem that fills up), mounted for the test; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_keeps_last_checkpoint_resumable(data: Path, small_filesystem: Path) -> None:
    """On a filesystem that fills up (not TMPDIR's), the failed save leaves the old last.ckpt whole; it resumes."""
    run = small_filesystem / "run"
    args = fashion_args(data, run, "--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
                        "--checkpoint.save_top_k=0", "--trainer.logger=false")
    cli = cli_main(args, run=False)
    cli.trainer.callbacks.append(FillDiskBeforeSecondEpoch(run))
    with pytest.raises(OSError) as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert error.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no temp file left
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    (run / "filler").unlink()
    resumed = cli_main(["fit", *args, "--ckpt_path=last"])
    assert resumed.trainer.global_step == 6


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished fit on the fake Fashion-MNIST, shared by the tests of its checkpoints."""
    run = tmp_path_factory.mktemp("trained")
    cli_main(["fit", *fashion_args(data, run, "--trainer.limit_val_batches=1")])
    return run


class TestCheckpointArguments:
    """`test` / `fit --ckpt_path` refuse what used to give silently wrong results."""

    def test_test_without_ckpt_path_is_an_error(self, trained: Path) -> None:
        """It used to test random weights and overwrite test/eval.json."""
        before = (trained / "test" / "eval.json").read_bytes() if (trained / "test" / "eval.json").exists() else None
        with pytest.raises(ValueError, match=r"`test` needs --ckpt_path.*weights would be random"):
            cli_main(["test", "--config", str(trained / "config.yaml")])
        after = (trained / "test" / "eval.json").read_bytes() if (trained / "test" / "eval.json").exists() else None
        assert before == after

    @pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
    def test_last_without_a_last_checkpoint(self, trained: Path, tmp_path: Path, subcommand: str) -> None:
        """`test --ckpt_path last` in a folder without last.ckpt used to evaluate random weights and write eval.json
        at chance level; now it names the file it looked for."""
        empty = tmp_path / "empty"
        missing = empty / "checkpoints" / "last.ckpt"
        with pytest.raises(FileNotFoundError, match=rf"`{subcommand} --ckpt_path last`: there is no '{missing}'"):
            cli_main([subcommand, "--config", str(trained / "config.yaml"), f"--trainer.default_root_dir={empty}",
                      "--ckpt_path=last"])
        assert not (empty / "test").exists()

    def test_checkpoint_of_another_architecture(self, data: Path, trained: Path, tmp_path: Path) -> None:
        """`test --config A --ckpt_path <B's checkpoint>` used to rebuild B silently and write into A's folder."""
        other = tmp_path / "other"
        cli_main(["fit", *fashion_args(data, other, "--trainer.limit_val_batches=1",
                                       "--model.net.init_args.pos_embed=learned")])
        with pytest.raises(ValueError, match=r"(?s)trained with other arguments.*pos_embed: checkpoint 'learned', "
                                             r"config 'rope_axial'"):
            cli_main(["test", "--config", str(trained / "config.yaml"),
                      f"--ckpt_path={other / 'checkpoints' / 'last.ckpt'}"])
        assert not (trained / "test-other").exists()
        config = (trained / "config.yaml").read_text()
        with pytest.raises(ValueError, match=r"pos_embed: checkpoint 'learned', config 'rope_axial'"):
            cli_main(["fit", "--config", str(trained / "config.yaml"),
                      f"--ckpt_path={other / 'checkpoints' / 'last.ckpt'}"])
        assert (trained / "config.yaml").read_text() == config  # fit did not switch architecture

    def test_resume_with_other_training_data_options(self, data: Path, trained: Path) -> None:
        with pytest.raises(ValueError, match=r"data.batch_size: checkpoint 16, config 8"):
            cli_main(["fit", "--config", str(trained / "config.yaml"), "--data.batch_size=8", "--ckpt_path=last"])

    def test_own_config_and_checkpoint_pass(self, trained: Path) -> None:
        cli_main(["test", "--config", str(trained / "config.yaml"), "--ckpt_path=last",
                  "--model.eval_resolutions=[28]", "--data.eval_batch_size=7", "--data.num_workers=0"])
        assert json.loads((trained / "test" / "eval.json").read_text())["results"][0]["resolution"] == 28

    def test_sigterm_during_test_exits_non_zero_without_a_report(self, trained: Path) -> None:
        """Lightning ends a `test` stopped by SIGTERM with status 0; the study would then read a missing report."""
        with pytest.raises(SystemExit) as stopped:
            cli_main(["test", "--config", str(trained / "config.yaml"), "--ckpt_path=last",
                      "--model.resolution_mode=extrapolate", "--data.eval_batch_size=8",
                      "--trainer.callbacks+=interruptions.SignalAtTestBatch", "--trainer.callbacks.batch=0",
                      f"--trainer.callbacks.signum={int(signal.SIGTERM)}"])
        assert stopped.value.code == 143
        assert not (trained / "test-extrapolate" / "eval.json").exists()

    @pytest.mark.parametrize("content, message", [
        (b"", r"is empty \(0 bytes\): not a checkpoint"),
        (bytes(range(256)) * 40, r"is not a checkpoint: PyTorch checkpoints are zip archives"),
    ])
    def test_not_a_checkpoint(self, trained: Path, tmp_path: Path, content: bytes, message: str) -> None:
        bad = tmp_path / "bad.ckpt"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message) as error:
            cli_main(["test", "--config", str(trained / "config.yaml"), f"--ckpt_path={bad}"])
        assert "weights_only=False" not in str(error.value)  # never the unsafe advice

    def test_truncated_checkpoint(self, trained: Path, tmp_path: Path) -> None:
        data = (trained / "checkpoints" / "last.ckpt").read_bytes()
        cut = tmp_path / "cut.ckpt"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=r"cut\.ckpt.*(damaged checkpoint|is not a checkpoint)"):
            cli_main(["test", "--config", str(trained / "config.yaml"), f"--ckpt_path={cut}"])


def test_run_folder_is_locked_while_in_use(data: Path, tmp_path: Path) -> None:
    """A second process in a busy run folder gets a clear error instead of writing next to the first."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from training.checkpoint import RunFolderLock; l = RunFolderLock(sys.argv[2]);"
                               "print('locked', flush=True); time.sleep(60)", str(REPO), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"run folder '{tmp_path}' is in use by another process \(pid "
                                               rf"{holder.pid}"):
            cli_main(["fit", *fashion_args(data, tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    with RunFolderLock(tmp_path):  # free again once the holder is gone
        pass


class TestRunFolderLockFile:
    """``.lock`` exists only while a process holds the folder; a dead holder's file is taken over, then removed."""

    def test_released_lock_leaves_no_file(self, data: Path, tmp_path: Path) -> None:
        with RunFolderLock(tmp_path) as lock:
            assert lock.path.read_text() == f"{os.getpid()}\n"
        assert not (tmp_path / ".lock").exists()
        cli_main(["fit", *fashion_args(data, tmp_path / "run")])
        assert not (tmp_path / "run" / ".lock").exists()

    def test_file_of_a_killed_holder_is_taken_over_and_removed(self, tmp_path: Path) -> None:
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                                   "from training.checkpoint import RunFolderLock; l = RunFolderLock(sys.argv[2]);"
                                   "print('locked', flush=True); time.sleep(60)", str(REPO), str(tmp_path)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()  # SIGKILL: no release
        holder.wait()
        assert (tmp_path / ".lock").read_text() == f"{holder.pid}\n"  # stale: its holder is dead
        with RunFolderLock(tmp_path) as lock:
            assert lock.path.read_text() == f"{os.getpid()}\n"
        assert not (tmp_path / ".lock").exists()

    def test_lock_file_removed_under_a_waiting_process_is_not_locked(self, tmp_path: Path) -> None:
        """A process that opened the file just before the holder removed it locks the new file, not the removed one."""
        first = RunFolderLock(tmp_path)
        stale = os.open(first.path, os.O_RDWR)  # a second process's open, just before the release
        first.release()
        second = RunFolderLock(tmp_path)
        try:
            fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed file: free, but no longer the lock
            with pytest.raises(RuntimeError, match="is in use by another process"):
                RunFolderLock(tmp_path)
        finally:
            os.close(stale)
            second.release()

    def test_a_forked_child_does_not_release_its_parents_lock(self, tmp_path: Path) -> None:
        lock = RunFolderLock(tmp_path)
        try:
            child = os.fork()
            if child == 0:  # a data worker, say, that drops the inherited object
                lock.release()
                os._exit(0)
            assert os.waitpid(child, 0)[1] == 0
            assert lock.path.exists()
            with pytest.raises(RuntimeError, match="is in use by another process"):
                RunFolderLock(tmp_path)
        finally:
            lock.release()


# ----------------------------------------------------------------------------- every shipped config


#: Each fit config with the configs it is composed over (a small file lists only what differs from its base).
FIT_CONFIG_STACKS = {
    "fashion_mnist.yaml": ["fashion_mnist.yaml"],
    "fashion_mnist_study_budget.yaml": ["fashion_mnist.yaml", "fashion_mnist_study_budget.yaml"],
    "fashion_mnist_long_budget.yaml": ["fashion_mnist.yaml", "fashion_mnist_study_budget.yaml", "fashion_mnist_long_budget.yaml"],
    "cifar10.yaml": ["cifar10.yaml"],
    "cifar100.yaml": ["cifar10.yaml", "cifar100.yaml"],
    "imagenet100.yaml": ["imagenet100.yaml"],
    "fsdp2.yaml": ["fashion_mnist.yaml", "fsdp2.yaml"],
}
#: In-process smoke runs stay in one process (FSDP2 on a mesh of 1; the 2-process run is a slow test).
SMOKE_OVERRIDES = {
    "fsdp2.yaml": ["--trainer.devices=1", "--trainer.strategy.init_args.data_parallel_size=1", "--trainer.accelerator=cpu"],
}


def config_args(name: str) -> list[str]:
    return [arg for part in FIT_CONFIG_STACKS[name] for arg in ("--config", str(CONFIGS / part))]


def test_every_config_is_covered() -> None:
    """Every YAML in configs/ is a fit config (with its base) or a study config, so every one is exercised below."""
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert shipped == set(FIT_CONFIG_STACKS) | {name for name in shipped if name.startswith("study_")}


@pytest.mark.parametrize("config", sorted(FIT_CONFIG_STACKS))
def test_fast_dev_run_every_config(data: Path, tmp_path: Path, config: str) -> None:
    base = CONFIGS / FIT_CONFIG_STACKS[config][0]
    cli = cli_main(["fit", *config_args(config), *smoke_args(base, data), *SMOKE_OVERRIDES.get(config, []),
                    "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1
    assert cli.model.net.num_classes == cli.datamodule.num_classes  # linked from the data, not written twice


def resolved(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit):
        cli_main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_cifar100_is_cifar10_with_other_data(capsys: pytest.CaptureFixture) -> None:
    """Composition: cifar100.yaml over cifar10.yaml changes exactly the data class and the run folder."""
    cifar10 = resolved(config_args("cifar10.yaml"), capsys)
    cifar100 = resolved(config_args("cifar100.yaml"), capsys)
    assert cifar100["data"]["class_path"] == "training.data.CIFAR100Data"
    assert cifar100["trainer"]["default_root_dir"] == "runs/cifar100"
    cifar100["data"]["class_path"] = cifar10["data"]["class_path"]
    cifar100["trainer"]["default_root_dir"] = cifar10["trainer"]["default_root_dir"]
    assert cifar100 == cifar10


@pytest.mark.slow
def test_compiled_fit_and_multi_resolution_test(data: Path, tmp_path: Path) -> None:
    """`--model.compile true` (fullgraph, dynamic shapes) trains, keeps plain checkpoint keys, and tests at other resolutions."""
    cli_main(["fit", *fashion_args(data, tmp_path, "--model.compile=true", "--trainer.limit_val_batches=1")])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "net.cls_token" in state and not any("_orig_mod" in k for k in state)
    cli_main(["test", "--config", str(tmp_path / "config.yaml"),
              f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "--model.eval_resolutions=[20, 36]",
              "--model.eval_protocols=[zoom]"])
    results = json.loads((tmp_path / "test" / "eval.json").read_text())["results"]
    assert [r["resolution"] for r in results] == [20, 36]


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_cpu_processes(data: Path, tmp_path: Path) -> None:
    """`--trainer.devices 2` on CPU runs DDP (gloo): each process takes half of every epoch."""
    args = fashion_args(data, tmp_path, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                        "--trainer.max_epochs=2", "--data.batch_size=8", "--trainer.limit_val_batches=1")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6  # 58 training images / 2 processes / batch 8 = 3 steps per epoch


@pytest.mark.slow
def test_ddp_sigterm_stops_both_ranks_at_one_step(data: Path, tmp_path: Path) -> None:
    """SIGTERM to the process that started DDP (rank 0) while both ranks are inside step 3: the ranks agree to stop
    after it, save one last.ckpt there and exit non-zero; `--ckpt_path last` then finishes the run."""
    run, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    args = fashion_args(data, run, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                        "--data.batch_size=4", "--trainer.limit_val_batches=1")
    pause = ["--trainer.callbacks+=interruptions.PauseAtStep", "--trainer.callbacks.step=2",
             f"--trainer.callbacks.folder={signals}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    rank0 = subprocess.Popen([sys.executable, str(REPO / "train.py"), "fit", *args, *pause], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(list(signals.glob("paused-*"))) < 2 and rank0.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = [int(p.name.split("-")[1]) for p in signals.glob("paused-*")]
        rank0.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        (signals / "go").touch()
        output = rank0.communicate(timeout=300)[0]
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ranks) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in ranks)
    finally:
        for pid in [rank0.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert rank0.returncode == 143, output[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 3)  # 58 images / 2 ranks / batch 4: 7 steps per epoch
    assert not fit_completed(run)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args, "--ckpt_path=last"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert fit_completed(run)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7


# ----------------------------------------------------------------------------- FSDP2


def train_losses(run_dir: Path) -> list[float]:
    return [float(r["train/loss"]) for r in read_metrics(run_dir) if r.get("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("pos_embed", ["rope_axial", "rope_mixed"])
def test_fsdp2_on_two_processes_gives_the_losses_of_one(data: Path, tmp_path: Path, pos_embed: str) -> None:
    """configs/fsdp2.yaml (ModelParallelStrategy: fully_shard per block, gloo on CPU) with half the batch on
    each of 2 processes trains as 1 process with the whole batch: the same losses step by step, within 5e-4
    (float32 reductions over batches of 8 instead of 16 differ by ~1e-6 at the first step, and AdamW's
    normalised steps carry that into the weights), and a full last.ckpt that `test` reads. The tolerance
    can fail: 1 process that sees only half of each batch (what a rank without gradient averaging learns)
    is off by over 10 times it."""
    common = ["--trainer.accelerator=cpu", "--trainer.max_epochs=2", "--trainer.max_steps=5",
              "--trainer.limit_val_batches=1", f"--model.net.init_args.pos_embed={pos_embed}",
              "--model.net.init_args.depth=2", "--model.net.init_args.drop_path_rate=0"]  # no per-rank randomness
    runs = {
        "one": ["--data.batch_size=16"],
        "fsdp2": ["--config", str(CONFIGS / "fsdp2.yaml"), "--data.batch_size=8"],
        "half": ["--data.batch_size=8"],
    }
    losses = {}
    for name, extra in runs.items():
        args = fashion_args(data, tmp_path / name, *common, *extra)
        result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = train_losses(tmp_path / name)
    assert len(losses["one"]) == len(losses["fsdp2"]) == 5 and len(set(losses["one"])) > 1
    gap = max(abs(a - b) for a, b in zip(losses["one"], losses["fsdp2"]))
    assert gap < 5e-4, losses
    assert max(abs(a - b) for a, b in zip(losses["one"], losses["half"])) > 5e-3, losses
    one_ckpt = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=False)
    sharded_ckpt = torch.load(tmp_path / "fsdp2" / "checkpoints" / "last.ckpt", weights_only=False)
    assert sharded_ckpt["state_dict"].keys() == one_ckpt["state_dict"].keys()
    for key, value in one_ckpt["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(sharded_ckpt["state_dict"][key], value, atol=1e-3, rtol=1e-3, msg=key)
    test = ["--config", str(tmp_path / "fsdp2" / "config.yaml"), "--ckpt_path=last", *QUIET]  # on 2 processes again
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "test", *test], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fsdp2" / "test" / "eval.json").exists()


# ----------------------------------------------------------------------------- multi-resolution training


def test_multi_resolution_training_draws_a_size_per_batch(data: Path, tmp_path: Path) -> None:
    """`--model.train_resolutions`: each training batch at one of the sizes, drawn by (seed, epoch, batch);
    validation stays at the training size. Sizes off the patch grid are refused, naming the argument."""
    cli = cli_main(fashion_args(data, tmp_path, "--model.train_resolutions=[20, 28, 36]", "--trainer.max_epochs=2",
                                "--data.batch_size=8", "--trainer.limit_val_batches=1"), run=False)
    seen: list[tuple[bool, int]] = []
    cli.model.net.register_forward_pre_hook(lambda net, args: seen.append((net.training, args[0].shape[-1])))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = cli.trainer.num_training_batches
    expected = [vit.draw_image_size([20, 28, 36], seed=0, epoch=epoch, batch_index=batch)
                for epoch in range(2) for batch in range(steps)]
    assert [size for training, size in seen if training] == expected
    assert set(expected) == {20, 28, 36}  # every size is drawn in these 14 batches
    assert {size for training, size in seen if not training} == {28}  # validation at img_size
    with pytest.raises(ValueError, match=r"train_resolutions=\[30\]"):
        cli_main(fashion_args(data, tmp_path / "bad", "--model.train_resolutions=[30]"), run=False)


def test_packed_training_gives_each_image_its_own_size(data: Path, tmp_path: Path) -> None:
    """`--model.packing true`: each training image at its own size (drawn per sample), one packed sequence per
    batch (mixup before the resize); validation and test run packed and give the unpacked logits."""
    args = fashion_args(data, tmp_path, "--model.packing=true", "--model.train_resolutions=[20, 28, 36]",
                        "--model.mixup_alpha=0.8", "--data.batch_size=8", "--trainer.max_steps=3",
                        "--trainer.limit_val_batches=1")
    cli = cli_main(args, run=False)
    packed_sizes: list[list[int]] = []
    forward_packed = cli.model.net.forward_packed

    def recording(images, **kwargs):
        if cli.model.training:
            packed_sizes.append([image.shape[-1] for image in images])
        return forward_packed(images, **kwargs)

    cli.model.net.forward_packed = recording
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    expected = [[vit.draw_image_size([20, 28, 36], seed=0, epoch=0, batch_index=8 * batch + i) for i in range(8)]
                for batch in range(3)]
    assert packed_sizes == expected and len({size for sizes in expected for size in sizes}) > 1
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        plain = ImageClassifier(cli.model.net, packing=False).eval().logits(x)
        torch.testing.assert_close(cli.model.eval().logits(x), plain, atol=1e-5, rtol=1e-5)
    cli_main(["test", "--config", str(tmp_path / "config.yaml"), "--ckpt_path=last", "--model.eval_resolutions=[28, 36]"])
    assert (tmp_path / "test" / "eval.json").exists()
    with pytest.raises(TypeError, match="packing=True needs a net with forward_packed"):
        ImageClassifier(timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10,
                                          depth=1), packing=True)
