"""training.data / datasets / transforms on tiny datasets written in the real on-disk formats.

The writers below (Fashion-MNIST gzip IDX, CIFAR python pickles, ImageFolder PNGs) are shared with
tests/test_train.py and tests/test_study.py.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from training.data import CIFAR10Data, CIFAR100Data, FashionMNISTData, ImageFolderData, split_indices
from training.datasets import EpochSampler, ImageTensorDataset, Transformed
from training.idx import read_idx
from training.transforms import eval_transform, train_transform

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------- fake datasets


def images_for(labels: np.ndarray, channels: int, size: int, seed: int) -> np.ndarray:
    """uint8 (N, size, size, channels): noise around a brightness that encodes the label, so it is learnable."""
    rng = np.random.default_rng(seed)
    base = (labels.astype(np.float64) % 10 * 25 + 10)[:, None, None, None]
    noise = rng.normal(0, 20, size=(len(labels), size, size, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (gzip when path ends in .gz) holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_fashion_mnist(root: Path, n_train: int = 64, n_test: int = 32) -> Path:
    """The four gzip IDX files of Fashion-MNIST (as the Debian package installs them) with N x 28 x 28 images."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images_for(labels, 1, 28, seed)[..., 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar(root: Path, num_classes: int, n_train: int = 80, n_test: int = 32) -> Path:
    """CIFAR-10 (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``) or CIFAR-100
    (``cifar-100-python/train, test, meta``) python pickles with 32 x 32 RGB images."""
    cifar10 = num_classes == 10
    folder = root / ("cifar-10-batches-py" if cifar10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if cifar10 else "fine_labels"

    def dump(name: str, labels: np.ndarray, seed: int) -> None:
        data = images_for(labels, 3, 32, seed).transpose(0, 3, 1, 2).reshape(len(labels), -1)  # rows of R, G, B planes
        names = [f"{i}.png" for i in range(len(labels))]
        batch = {"batch_label": name, label_key: labels.tolist(), "data": data, "filenames": names}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    train_labels = np.arange(n_train) % num_classes
    if cifar10:
        for i, part in enumerate(np.split(train_labels, 5)):
            dump(f"data_batch_{i + 1}", part, seed=i)
        dump("test_batch", np.arange(n_test) % num_classes, seed=9)
        meta = {"label_names": [f"class{i}" for i in range(10)]}
        meta_name = "batches.meta"
    else:
        dump("train", train_labels, seed=0)
        dump("test", np.arange(n_test) % num_classes, seed=9)
        meta = {"fine_label_names": [f"class{i}" for i in range(100)],
                "coarse_label_names": [f"c{i}" for i in range(20)]}
        meta_name = "meta"
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return root


def accept_fake_cifar(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point torchvision's CIFAR checksums at the fake files, so its integrity check runs and passes."""

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100):
        folder = root / cls.base_folder
        if not folder.is_dir():
            continue
        for attr in ("train_list", "test_list"):
            entries = [[name, md5(folder / name)] for name, _ in getattr(cls, attr)]
            monkeypatch.setattr(cls, attr, entries)
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


def write_image_folder(root: Path, classes: list[str], per_class: int = 2, size: int = 20) -> Path:
    """``root/{train,val}/<class>/<i>.png`` RGB PNGs."""
    for split, seed in (("train", 0), ("val", 1)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = images_for(np.full(per_class, label), 3, size, seed + label)
            for i, image in enumerate(pixels):
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def write_all(root: Path) -> Path:
    """A fake copy of every dataset type: fashion/, cifar/ (10 and 100), folder/ (3 classes), imagenet100/."""
    write_fashion_mnist(root / "fashion")
    write_cifar(root / "cifar", 10)
    write_cifar(root / "cifar", 100)
    write_image_folder(root / "folder", ["n01", "n02", "n03"], per_class=4, size=16)
    imagenet100 = (CONFIGS / "imagenet100_classes.txt").read_text().split()
    write_image_folder(root / "imagenet100", imagenet100, per_class=1, size=12)
    return root


# CLI overrides that make any shipped config run in about a second on CPU with the fake data.
TINY_NET = ["--model.net.init_args.embed_dim=32", "--model.net.init_args.depth=1", "--model.net.init_args.num_heads=2"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]
DATA_ROOTS = {
    "FashionMNISTData": "fashion", "CIFAR10Data": "cifar", "CIFAR100Data": "cifar", "ImageFolderData": "imagenet100"
}


def smoke_args(fit_config: Path, root: Path) -> list[str]:
    """Overrides for a shipped fit config: fake data under ``root``, a tiny net, CPU, no compile."""
    data_class = next(name for name in DATA_ROOTS if name in fit_config.read_text())
    args = [f"--data.root={root / DATA_ROOTS[data_class]}", "--data.num_workers=0", "--data.batch_size=4",
            "--model.compile=false", "--trainer.accelerator=cpu", "--trainer.devices=1", *TINY_NET, *QUIET]
    if data_class.startswith("CIFAR"):
        args.append("--data.download=false")
    return args


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all(tmp_path_factory.mktemp("data"))


# ----------------------------------------------------------------------------- readers


class TestReadIdx:
    @pytest.mark.parametrize("suffix", [".gz", ""])
    def test_roundtrip(self, tmp_path: Path, suffix: str) -> None:
        """A written uint8 array reads back equal, gzip or plain."""
        array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
        write_idx(tmp_path / f"x{suffix}", array)
        np.testing.assert_array_equal(read_idx(tmp_path / f"x{suffix}"), array)

    def test_bad_header(self, tmp_path: Path) -> None:
        (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
        with pytest.raises(ValueError, match="not an IDX file"):
            read_idx(tmp_path / "bad")

    def test_corrupt_gzip_names_the_file(self, tmp_path: Path) -> None:
        """Bytes that are not gzip at all: a ValueError naming the file, not a bare BadGzipFile."""
        (tmp_path / "x.gz").write_bytes(b"not gzip at all" * 10)
        with pytest.raises(ValueError, match=r"x\.gz is not a readable gzip file.*corrupt or truncated"):
            read_idx(tmp_path / "x.gz")

    def test_truncated_gzip_names_the_file(self, tmp_path: Path) -> None:
        """A .gz cut short (an interrupted download): a ValueError naming the file, not a bare EOFError."""
        write_idx(tmp_path / "x.gz", np.arange(4000, dtype=np.int64).astype(np.uint8).reshape(40, 100))
        data = (tmp_path / "x.gz").read_bytes()
        (tmp_path / "x.gz").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=r"x\.gz is not a readable gzip file \(EOFError"):
            read_idx(tmp_path / "x.gz")

    def test_truncated(self, tmp_path: Path) -> None:
        write_idx(tmp_path / "x", np.zeros((4, 4), np.uint8))
        (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-3])
        with pytest.raises(ValueError, match=r"shape \(4, 4\) \(28 bytes\) but the file has 25 bytes"):
            read_idx(tmp_path / "x")


# ----------------------------------------------------------------------------- data modules


class TestDataModules:
    def test_fashion_mnist(self, fake_root: Path) -> None:
        """Images come back as written; train batches are normalized 28px, test loaders one per resolution."""
        dm = FashionMNISTData(root=str(fake_root / "fashion"), batch_size=16, num_workers=0, eval_resolutions=[20, 36],
                              eval_protocols=["zoom", "canvas"])
        dm.setup("fit")
        assert dm.test_set is None  # fit never touches the test split
        assert (len(dm.train_set), len(dm.val_set)) == (58, 6)  # 10% of the 64 training images held out
        dm.setup("test")
        assert len(dm.test_set) == 32
        expected = images_for(np.arange(32) % 10, 1, 28, seed=1)[..., 0]
        image, label = dm.test_set[5]
        np.testing.assert_array_equal(image[0].numpy(), expected[5])
        assert label == 5
        train_images = images_for(np.arange(64) % 10, 1, 28, seed=0)[..., 0]
        val_image, _ = dm.val_set[0]
        np.testing.assert_array_equal(val_image[0].numpy(), train_images[dm.val_set.indices[0]])
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (16,)
        assert len(dm.train_dataloader()) == 3  # 58 images, batch 16, drop_last
        assert len(dm.val_dataloader().dataset) == 6
        loaders = dm.test_dataloader()  # protocol-major: zoom 20, zoom 36, canvas 20, canvas 36
        assert [next(iter(dl))[0].shape[-1] for dl in loaders] == [20, 36, 20, 36]
        assert all(len(dl.dataset) == 32 for dl in loaders)
        canvas36 = next(iter(loaders[3]))[0]
        background = (0 - dm.mean[0]) / dm.std[0]
        torch.testing.assert_close(canvas36[:, :, :4], torch.full_like(canvas36[:, :, :4], background))

    @pytest.mark.parametrize("cls, num_classes", [(CIFAR10Data, 10), (CIFAR100Data, 100)])
    def test_cifar(self, fake_root: Path, monkeypatch: pytest.MonkeyPatch, cls: type, num_classes: int) -> None:
        """torchvision's CIFAR loaders read the pickles; labels and pixels match what was written."""
        accept_fake_cifar(monkeypatch, fake_root / "cifar")
        dm = cls(root=str(fake_root / "cifar"), batch_size=8, num_workers=0)
        assert dm.num_classes == num_classes and dm.in_chans == 3
        dm.setup("fit")
        dm.setup("test")
        assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (72, 8, 32)
        assert [dm.test_set[i][1] for i in range(3)] == [0, 1, 2]
        expected = images_for(np.arange(32) % num_classes, 3, 32, seed=9)[7].transpose(2, 0, 1)
        np.testing.assert_array_equal(dm.test_set[7][0].numpy(), expected)
        x, _ = next(iter(dm.train_dataloader()))
        assert x.shape == (8, 3, 32, 32)

    def test_image_folder_subset(self, fake_root: Path, tmp_path: Path) -> None:
        """A class list picks and orders the classes; labels follow the list."""
        (tmp_path / "classes.txt").write_text("n03\nn01\n")
        dm = ImageFolderData(root=str(fake_root / "folder"), img_size=16, class_list=str(tmp_path / "classes.txt"),
                             batch_size=2, num_workers=0)
        assert dm.num_classes == 2
        dm.setup("fit")
        dm.setup("test")
        folder = dm.train_set.dataset  # the train/ tree; val_set holds out 1 of its 8 images
        assert sorted(label for _, label in folder.samples) == [0] * 4 + [1] * 4
        assert {Path(path).parent.name: label for path, label in folder.samples} == {"n03": 0, "n01": 1}
        assert (len(dm.train_set), len(dm.val_set)) == (7, 1)
        assert Path(dm.test_set.root).name == "val"  # the official val/ is the test split
        x, _ = next(iter(dm.test_dataloader()[0]))
        assert x.shape == (2, 3, 16, 16)

    def test_image_folder_all_classes(self, fake_root: Path) -> None:
        dm = ImageFolderData(root=str(fake_root / "folder"), img_size=16, num_workers=0)
        assert dm.num_classes == 3


class TestValidationSplit:
    """The hold-out is a function of (size, fraction, split_seed) alone: disjoint from train, the same for every run."""

    def test_disjoint_and_complete(self) -> None:
        train, val = split_indices(60_000, 0.1)
        assert len(val) == 6000 and len(train) == 54_000
        assert not set(train) & set(val)
        assert sorted(train + val) == list(range(60_000))

    def test_independent_of_run_seed_and_global_rng(self) -> None:
        from lightning.pytorch import seed_everything

        seed_everything(0)
        first = split_indices(1000, 0.1)
        seed_everything(1)
        torch.rand(7)
        assert split_indices(1000, 0.1) == first
        assert split_indices(1000, 0.1, split_seed=1) != first

    def test_identical_across_variants_and_seeds(self, fake_root: Path) -> None:
        """Data modules built as two runs of the study would build them (other seed, other variant): same val images."""
        from lightning.pytorch import seed_everything

        sets = []
        for seed in (0, 1, 2):
            seed_everything(seed)
            dm = FashionMNISTData(root=str(fake_root / "fashion"), num_workers=0)
            dm.setup("fit")
            sets.append((dm.train_set.indices, dm.val_set.indices))
        assert sets[0] == sets[1] == sets[2]
        assert not set(sets[0][0]) & set(sets[0][1])

    @pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
    def test_bad_fraction(self, fake_root: Path, fraction: float) -> None:
        with pytest.raises(ValueError, match=rf"val_fraction={fraction} must be in \(0, 1\)"):
            FashionMNISTData(root=str(fake_root / "fashion"), val_fraction=fraction)


class TestBadDataOptions:
    def test_eval_batch_size_zero_is_an_error(self, fake_root: Path) -> None:
        """0 used to be replaced by batch_size silently."""
        with pytest.raises(ValueError, match=r"eval_batch_size=0 must be a positive int \(or None"):
            FashionMNISTData(root=str(fake_root / "fashion"), eval_batch_size=0)

    def test_eval_batch_size_none_means_batch_size(self, fake_root: Path) -> None:
        assert FashionMNISTData(root=str(fake_root / "fashion"), batch_size=8).eval_batch_size == 8

    def test_unknown_protocol(self, fake_root: Path) -> None:
        with pytest.raises(ValueError, match=r"eval_protocols=\['zoom', 'crop'\] must be .* \['zoom', 'canvas'\]"):
            FashionMNISTData(root=str(fake_root / "fashion"), eval_protocols=["zoom", "crop"])

    def test_corrupt_dataset_file(self, tmp_path: Path) -> None:
        root = write_fashion_mnist(tmp_path / "fashion")
        (root / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
        dm = FashionMNISTData(root=str(root), num_workers=0)
        with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not a readable gzip file"):
            dm.setup("fit")


class TestMissingData:
    def test_fashion_mnist_says_how_to_get_it(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data\.download true"):
            FashionMNISTData(root=str(tmp_path / "nowhere"))

    def test_fashion_mnist_download_defers_the_check(self, tmp_path: Path) -> None:
        FashionMNISTData(root=str(tmp_path / "later"), download=True)

    def test_cifar(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*--data\.download true"):
            CIFAR100Data(root=str(tmp_path))

    def test_image_folder(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"train.*is not a directory"):
            ImageFolderData(root=str(tmp_path))

    def test_image_folder_missing_class(self, fake_root: Path, tmp_path: Path) -> None:
        (tmp_path / "classes.txt").write_text("n01\nn99\n")
        dm = ImageFolderData(root=str(fake_root / "folder"), class_list=str(tmp_path / "classes.txt"), num_workers=0)
        with pytest.raises(FileNotFoundError, match="1 of the 2 listed classes have no folder.*n99"):
            dm.setup("fit")


# ----------------------------------------------------------------------------- sampling and transforms


class TestRepeatableAugmentation:
    def dataset(self) -> Transformed:
        images = torch.arange(10 * 28 * 28, dtype=torch.int64).remainder(251).to(torch.uint8).view(10, 1, 28, 28)
        tf = train_transform(28, (0.5,), (0.5,), crop="random_resized_crop", min_scale=0.2)
        return Transformed(ImageTensorDataset(images, torch.arange(10)), tf)

    def epoch(self, seed: int, epoch: int, rank: int = 0, replicas: int = 1) -> list[tuple[int, torch.Tensor]]:
        data = self.dataset()
        sampler = EpochSampler(data, num_replicas=replicas, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        return [(key[0], data[key][0]) for key in sampler]

    def test_same_seed_and_epoch_repeat(self) -> None:
        """(seed, epoch) fixes both the order and every augmented pixel, whatever the global RNG did."""
        first = self.epoch(seed=3, epoch=2)
        torch.manual_seed(123)
        again = self.epoch(seed=3, epoch=2)
        assert [i for i, _ in first] == [i for i, _ in again]
        for (_, a), (_, b) in zip(first, again):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

    def test_epoch_changes_order_and_augmentation(self) -> None:
        e0, e1 = dict(self.epoch(seed=3, epoch=0)), dict(self.epoch(seed=3, epoch=1))
        assert list(e0) != list(e1)
        assert max((e0[i] - e1[i]).abs().max().item() for i in e0) > 0.1

    def test_ranks_split_the_epoch(self) -> None:
        """Two replicas see disjoint halves of the single-replica epoch, with the same augmentation per sample."""
        whole = dict(self.epoch(seed=1, epoch=0))
        halves = [dict(self.epoch(seed=1, epoch=0, rank=r, replicas=2)) for r in (0, 1)]
        assert sorted([*halves[0], *halves[1]]) == list(range(10))
        for half in halves:
            for i, image in half.items():
                torch.testing.assert_close(image, whole[i], atol=0, rtol=0)

    def test_fork_rng_leaves_global_state(self) -> None:
        data = self.dataset()
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        data[(0, 99)]
        torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)


class TestTransforms:
    @pytest.mark.parametrize("crop_pct, expected", [(1.0, 0.0), (0.5, 0.0)])
    def test_eval_resizes_to_resolution(self, crop_pct: float, expected: float) -> None:
        """A constant image stays constant (normalized to 0 when equal to the mean) at any resolution."""
        image = torch.full((3, 30, 40), 128, dtype=torch.uint8)
        out = eval_transform(24, (128 / 255,) * 3, (0.25,) * 3, crop_pct=crop_pct)(image)
        assert out.shape == (3, 24, 24)
        torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-5, rtol=0)

    def test_canvas_keeps_the_image_unscaled(self) -> None:
        """canvas: the training-size view, pixel for pixel, centred on zeros (or centre-cropped when smaller)."""
        image = torch.randint(1, 256, (1, 28, 28), dtype=torch.uint8)
        plain = eval_transform(28, (0.0,), (1.0,))(image)
        big = eval_transform(44, (0.0,), (1.0,), protocol="canvas", train_resolution=28)(image)
        assert big.shape == (1, 44, 44)
        torch.testing.assert_close(big[:, 8:36, 8:36], plain, atol=0, rtol=0)
        assert big[:, :8].abs().max() == 0 and big[:, 36:].abs().max() == 0
        small = eval_transform(20, (0.0,), (1.0,), protocol="canvas", train_resolution=28)(image)
        torch.testing.assert_close(small, plain[:, 4:24, 4:24], atol=0, rtol=0)
        zoom = eval_transform(44, (0.0,), (1.0,), protocol="zoom")(image)
        assert zoom.shape == (1, 44, 44) and zoom[:, :8].abs().max() > 0  # zoom fills the whole grid

    def test_bad_protocol(self) -> None:
        with pytest.raises(ValueError, match=r"protocol='pad' is not one of \['zoom', 'canvas'\]"):
            eval_transform(24, (0.5,), (0.5,), protocol="pad")

    def test_bad_crop_pct(self) -> None:
        with pytest.raises(ValueError, match=r"crop_pct=1.5 must be in \(0, 1\]"):
            eval_transform(24, (0.5,), (0.5,), crop_pct=1.5)

    def test_pad_crop_keeps_size(self) -> None:
        image = torch.zeros((1, 28, 28), dtype=torch.uint8)
        out = train_transform(28, (0.0,), (1.0,), crop="pad_crop", padding=2, randaugment_magnitude=9)(image)
        assert out.shape == (1, 28, 28)
