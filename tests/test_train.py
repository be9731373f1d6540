"""train.py / training.cli / training.module: fit, test at several resolutions, resume, DDP, bad input.

Everything runs the real CLI (in-process unless it needs a fresh interpreter) on the tiny datasets
from tests/test_data.py, with a one-block 32-wide ViT.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import fsspec.implementations.local
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from test_data import CONFIGS, QUIET, TINY_NET, accept_fake_cifar, smoke_args, write_all
from training.cli import auto_precision, cli_main
from training.data import FashionMNISTData
from training.transforms import eval_transform

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all(tmp_path_factory.mktemp("data"))


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


DATASETS = {
    "fashion_mnist": ["--data=training.data.FashionMNISTData", "--data.root={root}/fashion", "--data.img_size=28"],
    "cifar10": ["--data=training.data.CIFAR10Data", "--data.root={root}/cifar"],
    "cifar100": ["--data=training.data.CIFAR100Data", "--data.root={root}/cifar"],
    "image_folder": ["--data=training.data.ImageFolderData", "--data.root={root}/folder", "--data.img_size=16"],
}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_fit_few_steps(data: Path, tmp_path: Path, dataset: str) -> None:
    """Three optimizer steps on each dataset type leave the run folder layout with the right step count."""
    args = [a.format(root=data) for a in DATASETS[dataset]]
    cli = cli_main(
        ["fit", *args, "--data.batch_size=4", "--data.num_workers=0", "--model.net.patch_size=4", *TINY_NET, *QUIET,
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.trainer.global_step == 3
    assert cli.model.net.num_classes == cli.datamodule.num_classes
    assert cli.model.net.in_chans == cli.datamodule.in_chans
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert "pos_embed: rope_axial" in (tmp_path / "config.yaml").read_text()
    assert 0.0 <= val_rows(tmp_path)[0]["val/top1"] <= 1.0
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_multi_resolution_eval_matches_manual_evaluation(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`test` at 20/28/36px writes the table, eval.json and eval.csv; the numbers equal a plain loop."""
    cli_main(["fit", *fashion_args(data, tmp_path, "--trainer.limit_val_batches=1")])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    cli = cli_main(["test", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={ckpt}",
                    "--model.eval_resolutions=[20, 28, 36]"])
    report = json.loads((tmp_path / "test" / "eval.json").read_text())
    assert [r["resolution"] for r in report["results"]] == [20, 28, 36]
    assert report["meta"]["train_resolution"] == 28 and report["meta"]["patch_size"] == 4
    with open(tmp_path / "test" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    from_csv = [(int(r["resolution"]), float(r["top1"])) for r in rows]
    assert from_csv == [(r["resolution"], r["top1"]) for r in report["results"]]
    printed = capsys.readouterr().out
    assert "| 36 | 9x9 |" in printed and "| 28 (train) | 7x7 |" in printed

    net = cli.model.net.eval()
    net.load_state_dict({k[len("net."):]: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()})
    test_set = FashionMNISTData(root=str(data / "fashion")).load(train=False)
    dm = cli.datamodule
    for record in report["results"]:
        tf = eval_transform(record["resolution"], dm.mean, dm.std)
        x = torch.stack([tf(test_set[i][0]) for i in range(len(test_set))])
        y = torch.tensor([test_set[i][1] for i in range(len(test_set))])
        with torch.no_grad():
            expected = (net(x).argmax(-1) == y).float().mean().item()
        assert record["top1"] == pytest.approx(expected, abs=1e-6)
        assert "top5" not in record  # 10 classes: top-1 only

    # Another resolution mode writes next to, not over, the default; the training grid is unaffected by it.
    cli_main(["test", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={ckpt}",
              "--model.eval_resolutions=[28, 36]", "--model.resolution_mode=interpolate"])
    interpolated = json.loads((tmp_path / "test-interpolate" / "eval.json").read_text())
    assert interpolated["meta"]["resolution_mode"] == "interpolate"
    assert interpolated["results"][0] == report["results"][1]  # 28px, identical
    assert json.loads((tmp_path / "test" / "eval.json").read_text()) == report


def test_top5_with_more_than_ten_classes(data: Path, tmp_path: Path) -> None:
    cli_main(["fit", "--data=training.data.CIFAR100Data", f"--data.root={data / 'cifar'}", "--data.batch_size=8",
              "--data.num_workers=0", "--model.net.patch_size=4", *TINY_NET, *QUIET, "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
              f"--trainer.default_root_dir={tmp_path}"])
    cli_main(["test", "--config", str(tmp_path / "config.yaml"),
              f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "--model.eval_resolutions=[16, 32]"])
    results = json.loads((tmp_path / "test" / "eval.json").read_text())["results"]
    assert [r["resolution"] for r in results] == [16, 32]
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in results)


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
    extra = ["--trainer.max_epochs=2", "--model.net.drop_path_rate=0.2", "--model.mixup_alpha=0.8",
             "--model.cutmix_alpha=1.0", "--data.randaugment_magnitude=9", "--trainer.limit_val_batches=1",
             f"--data.num_workers={num_workers}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_main(["fit", *fashion_args(data, straight, *extra)])

    first = cli_main(fashion_args(data, resumed, *extra), run=False)
    first.trainer.callbacks.append(StopAfterFirstEpoch())
    first.trainer.fit(first.model, datamodule=first.datamodule)
    assert first.trainer.current_epoch == 1 and first.trainer.global_step == 4
    cli_main(["fit", *fashion_args(data, resumed, *extra), "--ckpt_path=last"])

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 8)
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert val_rows(resumed)[1] == pytest.approx(val_rows(straight)[1], abs=1e-6)


# ----------------------------------------------------------------------------- bad input and interruption


class TestBadInput:
    def test_resolution_not_multiple_of_patch(self, data: Path, tmp_path: Path) -> None:
        message = r"eval_resolutions=\[28, 30\]: \[30\] not a positive multiple of patch_size=4"
        with pytest.raises(ValueError, match=message):
            cli_main(["fit", *fashion_args(data, tmp_path, "--model.eval_resolutions=[28, 30]")])

    def test_unknown_pos_embed(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"pos_embed='rope_bogus' is not one of \['learned'"):
            cli_main(["fit", *fashion_args(data, tmp_path, "--model.net.pos_embed=rope_bogus")])

    def test_missing_dataset(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST not found.*apt-get install dataset-fashion-mnist"):
            cli_main(["fit", *fashion_args(tmp_path / "missing", tmp_path)])


def test_failed_checkpoint_write_keeps_previous(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies halfway (disk full) in epoch 2 leaves epoch 1's last.ckpt whole and no partial file."""
    extra = ["--trainer.max_epochs=2", "--trainer.limit_val_batches=1", "--checkpoint.save_top_k=0"]
    writes = {"n": 0}
    real_write = fsspec.implementations.local.LocalFileOpener.write

    def failing_write(self, data: bytes) -> int:
        if str(self.path).endswith(".ckpt"):
            writes["n"] += 1
            if writes["n"] > 1:  # the first checkpoint write is epoch 1's last.ckpt
                real_write(self, data[: len(data) // 2])
                raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        cli_main(["fit", *fashion_args(data, tmp_path, *extra)])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 4)


# ----------------------------------------------------------------------------- every shipped config


FIT_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("study_"))


def test_configs_exist() -> None:
    assert set(FIT_CONFIGS) >= {"fashion_mnist.yaml", "cifar10.yaml", "cifar100.yaml", "imagenet100.yaml"}


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_fast_dev_run_every_config(data: Path, tmp_path: Path, config: str) -> None:
    cli = cli_main(["fit", "--config", str(CONFIGS / config), *smoke_args(CONFIGS / config, data),
                    "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1


@pytest.mark.slow
def test_compiled_fit_and_multi_resolution_test(data: Path, tmp_path: Path) -> None:
    """`--model.compile true` trains, keeps plain checkpoint keys, and recompiles for each test resolution."""
    cli_main(["fit", *fashion_args(data, tmp_path, "--model.compile=true", "--trainer.limit_val_batches=1")])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "net.cls_token" in state and not any("_orig_mod" in k for k in state)
    cli_main(["test", "--config", str(tmp_path / "config.yaml"),
              f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "--model.eval_resolutions=[20, 36]"])
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
    assert ckpt["global_step"] == 8  # 64 images / 2 processes / batch 8 = 4 steps per epoch
