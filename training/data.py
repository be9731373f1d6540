"""LightningDataModules: Fashion-MNIST, CIFAR-10/100 and ImageFolder trees (ImageNet, Imagenette, ImageNet-100).

Three splits, never mixed:

* **train**: the training split minus the validation hold-out;
* **val**: a seeded hold-out of ``val_fraction`` of the training split (`split_indices`), the same
  for every model and every ``seed_everything`` (it depends on ``split_seed`` only); it drives
  checkpoint selection (best.ckpt) and the ``val/*`` curves, at ``img_size``;
* **test**: the dataset's test split (for ImageFolder trees the official ``val_dir``), used only by
  ``train.py test``. Its loaders are a list, one per (protocol, resolution) of ``eval_protocols`` x
  ``eval_resolutions`` in that order (protocol-major), so ``trainer.test`` evaluates one checkpoint
  everywhere in one call.
"""

from __future__ import annotations

import abc
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from jsonargparse.typing import Path_fr
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import EpochSampler, ImageTensorDataset, SubsetImageFolder, Transformed
from .idx import find_idx, read_idx
from .transforms import EVAL_PROTOCOLS, EvalProtocol, TrainCrop, eval_transform, train_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_APT_ROOT = "/usr/share/datasets/fashion-mnist"


def split_indices(n: int, val_fraction: float, split_seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) indices of a training split of ``n`` samples: a seeded random hold-out of
    ``round(val_fraction * n)`` samples (at least 1) for validation, the rest for training, each sorted.

    Depends only on (n, val_fraction, split_seed), never on the global RNG or the run's seed.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1): the share of the training split held out")
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} training samples leaves none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class ImageDataModule(LightningDataModule, abc.ABC):
    """Shared loaders and transforms; subclasses set the statistics below and implement `load`.

    Args:
        root: dataset folder.
        img_size: training (and validation) resolution.
        batch_size: per-device training batch size.
        eval_batch_size: per-device batch size for validation and test (default: ``batch_size``).
        num_workers: DataLoader worker processes (0 loads in the main process).
        crop: training crop, see `training.transforms.train_transform`.
        min_scale: smallest crop area for ``random_resized_crop``.
        padding: padding for ``pad_crop``.
        hflip: random horizontal flips.
        randaugment_magnitude: RandAugment (2 ops) at this magnitude; None disables it.
        eval_resolutions: test resolutions (default ``[img_size]``); usually linked from the model's.
        eval_protocols: how test images reach each resolution (`training.transforms.EvalProtocol`):
            ``"zoom"`` (resized) and/or ``"canvas"`` (unscaled on a blank canvas); linked from the model's.
        eval_crop_pct: evaluation resizes to ``resolution / eval_crop_pct`` then center-crops.
        val_fraction: share of the training split held out for validation (checkpoint selection).
        split_seed: seed of that hold-out; keep it fixed so every run validates on the same images.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    in_chans: int = 3

    def __init__(
        self,
        root: str,
        img_size: int,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        crop: TrainCrop = "random_resized_crop",
        min_scale: float = 0.08,
        padding: int = 4,
        hflip: bool = True,
        randaugment_magnitude: int | None = None,
        eval_resolutions: list[int] | None = None,
        eval_protocols: list[EvalProtocol] | None = None,
        eval_crop_pct: float = 1.0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int" + (
                    " (or None: the same as batch_size)" if name == "eval_batch_size" else ""))
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0 (0 loads in the main process)")
        if eval_resolutions is not None and (not eval_resolutions or min(eval_resolutions) < 1):
            raise ValueError(f"eval_resolutions={eval_resolutions} must be a non-empty list of positive ints")
        self.eval_protocols = check_protocols(eval_protocols)
        # Recorded in checkpoints, so `train.py` can refuse a checkpoint trained on other data.
        self.save_hyperparameters()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1): the share of the training split held out")
        self.root = Path(root)
        self.img_size = img_size
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_tf = train_transform(
            img_size, self.mean, self.std, crop, min_scale, padding, hflip, randaugment_magnitude
        )
        self.eval_resolutions = list(eval_resolutions or [img_size])
        self.eval_crop_pct = eval_crop_pct
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.start_epoch = 0
        self.start_batch = 0

    @abc.abstractmethod
    def load(self, train: bool) -> Dataset:
        """The dataset's training split (``train=True``) or test split as raw (image, label) samples."""

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.val_set is None:
            full = self.load(train=True)
            train_idx, val_idx = split_indices(len(full), self.val_fraction, self.split_seed)
            self.train_set, self.val_set = Subset(full, train_idx), Subset(full, val_idx)
        if stage == "test" and self.test_set is None:
            self.test_set = self.load(train=False)

    def state_dict(self) -> dict[str, int]:
        """Where a resumed fit starts (saved in checkpoints): the epoch, and the training batches of it already
        trained on (0 at an epoch end)."""
        epochs = self.trainer.fit_loop.epoch_progress.current
        inside = epochs.started > epochs.processed  # an epoch is running: the checkpoint is from inside it
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if inside else 0
        return {"epoch": epochs.processed, "batch": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.start_epoch = state_dict["epoch"]
        self.start_batch = state_dict.get("batch", 0)  # checkpoints from before mid-epoch saves: epoch ends
        # train_dataloader resumes inside the epoch from this state, which Lightning's check cannot see.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def train_dataloader(self) -> DataLoader:
        # Order and augmentations depend only on (seed, epoch, index), so resuming repeats them exactly.
        # A resumed fit creates its first iterator (and workers prefetch indices) before Lightning calls
        # set_epoch, hence the epoch from the checkpoint, and it continues that epoch after the batches it
        # had trained on; the loader's own generator keeps iterator creation from drawing on the global RNG.
        trainer = self.trainer
        sampler = EpochSampler(
            self.train_set,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )
        sampler.resume_at(self.start_epoch, self.start_batch * self.batch_size)
        return DataLoader(
            Transformed(self.train_set, self.train_tf),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator(),
        )

    def val_dataloader(self) -> DataLoader:
        """The validation hold-out at the training resolution."""
        return self._eval_loader(self.val_set, self.img_size, "zoom", persistent=True)

    def test_dataloader(self) -> list[DataLoader]:
        """The test split, one loader per (protocol, resolution), protocol-major."""
        return [
            self._eval_loader(self.test_set, r, p, persistent=False)
            for p in self.eval_protocols
            for r in self.eval_resolutions
        ]

    def _eval_loader(self, dataset: Dataset, resolution: int, protocol: EvalProtocol, persistent: bool) -> DataLoader:
        tf = eval_transform(resolution, self.mean, self.std, self.eval_crop_pct, protocol, self.img_size)
        return DataLoader(
            Transformed(dataset, tf),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and self.num_workers > 0,
        )


def check_protocols(protocols: Sequence[str] | None) -> list[EvalProtocol]:
    """``protocols`` as a list (default ``["zoom"]``); ValueError for an empty, repeated or unknown entry."""
    if protocols is None:
        return ["zoom"]
    protocols = list(protocols)
    if not protocols or len(set(protocols)) != len(protocols) or not set(protocols) <= set(EVAL_PROTOCOLS):
        raise ValueError(
            f"eval_protocols={protocols} must be a non-empty list without repeats of {list(EVAL_PROTOCOLS)}"
        )
    return protocols


class FashionMNISTData(ImageDataModule):
    """Fashion-MNIST (10 classes, 28x28 grayscale) from its gzip IDX files.

    ``root`` holds ``train-images-idx3-ubyte.gz`` etc. (the Debian package ``dataset-fashion-mnist``
    installs them in /usr/share/datasets/fashion-mnist), or torchvision's ``FashionMNIST/raw/`` layout,
    which ``download=True`` creates.
    """

    mean = (0.2860,)
    std = (0.3530,)
    num_classes = 10
    in_chans = 1
    files = {
        True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(
        self,
        root: str = FASHION_MNIST_APT_ROOT,
        img_size: int = 28,
        download: bool = False,
        crop: TrainCrop = "pad_crop",
        padding: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(root=root, img_size=img_size, crop=crop, padding=padding, **kwargs)
        self.download = download
        if not download:
            self._paths(train=True)

    def prepare_data(self) -> None:
        if self.download:
            torchvision.datasets.FashionMNIST(os.fspath(self.root), download=True)

    def _paths(self, train: bool) -> tuple[Path, Path]:
        found = [find_idx(self.root, stem) for stem in self.files[train]]
        for stem, path in zip(self.files[train], found):
            if path is None:
                raise FileNotFoundError(
                    f"Fashion-MNIST not found: data.root={os.fspath(self.root)!r} has no {stem}.gz (nor "
                    f"FashionMNIST/raw/{stem}). Install it with `apt-get install dataset-fashion-mnist` (gzip "
                    f"IDX files in {FASHION_MNIST_APT_ROOT}, the default root), or download it with torchvision: "
                    "`--data.download true --data.root data/fashion-mnist`."
                )
        return found[0], found[1]

    def load(self, train: bool) -> Dataset:
        image_path, label_path = self._paths(train)
        images = torch.from_numpy(read_idx(image_path)).unsqueeze(1)  # N, 1, 28, 28
        labels = torch.from_numpy(read_idx(label_path)).long()
        return ImageTensorDataset(images, labels)


class CIFAR10Data(ImageDataModule):
    """CIFAR-10 (10 classes, 32x32 RGB) in its python pickle format: ``root/cifar-10-batches-py/``."""

    dataset_class = torchvision.datasets.CIFAR10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    num_classes = 10

    def __init__(
        self, root: str = "data", img_size: int = 32, download: bool = False, crop: TrainCrop = "pad_crop", **kwargs
    ) -> None:
        super().__init__(root=root, img_size=img_size, crop=crop, **kwargs)
        self.download = download
        folder = self.root / self.dataset_class.base_folder
        if not download and not folder.is_dir():
            raise FileNotFoundError(
                f"{self.dataset_class.__name__} not found: {os.fspath(folder)!r} does not exist. Add "
                f"`--data.download true` to download it into data.root={os.fspath(self.root)!r}, or point "
                f"--data.root at the folder that contains {self.dataset_class.base_folder}/."
            )

    def prepare_data(self) -> None:
        if self.download:
            self.dataset_class(os.fspath(self.root), download=True)

    def load(self, train: bool) -> Dataset:
        split = self.dataset_class(os.fspath(self.root), train=train)
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # N, 3, 32, 32
        return ImageTensorDataset(images, torch.tensor(split.targets))


class CIFAR100Data(CIFAR10Data):
    """CIFAR-100 (100 fine classes, 32x32 RGB) in its python pickle format: ``root/cifar-100-python/``."""

    dataset_class = torchvision.datasets.CIFAR100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    num_classes = 100


class ImageFolderData(ImageDataModule):
    """An ImageFolder tree ``root/{train_dir,val_dir}/<class>/<image>``: ImageNet, Imagenette, ImageNet-100.

    The validation hold-out comes from ``train_dir``; the official ``val_dir`` is the test split.

    ``class_list`` is a text file with one class folder name per line (configs/imagenet100_classes.txt
    picks ImageNet-100 out of ImageNet); labels follow its order. Without it every class folder is used.
    """

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        train_dir: str = "train",
        val_dir: str = "val",
        class_list: Path_fr | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        eval_crop_pct: float = 0.875,
        **kwargs,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        super().__init__(root=root, img_size=img_size, eval_crop_pct=eval_crop_pct, **kwargs)
        self.dirs = {True: self.root / train_dir, False: self.root / val_dir}
        for path in self.dirs.values():
            if not path.is_dir():
                raise FileNotFoundError(
                    f"ImageFolder split not found: {os.fspath(path)!r} is not a directory. data.root must hold "
                    f"{train_dir}/ and {val_dir}/, each with one sub-folder of images per class."
                )
        if class_list is None:
            self.classes = None
            self.num_classes = sum(1 for p in self.dirs[True].iterdir() if p.is_dir())
        else:
            self.classes = Path(os.fspath(class_list)).read_text().split()
            self.num_classes = len(self.classes)
        if self.num_classes < 2:
            raise ValueError(f"{os.fspath(self.dirs[True])!r} has {self.num_classes} classes; need at least 2")

    def load(self, train: bool) -> Dataset:
        return SubsetImageFolder(self.dirs[train], classes=self.classes)
