"""LightningDataModules: Fashion-MNIST, CIFAR-10/100 and ImageFolder trees (ImageNet, Imagenette, ImageNet-100).

Each module trains at ``img_size`` and validates on the test split at ``img_size``. Its test loaders
are a list, one per entry of ``eval_resolutions``, each resizing the test split to that resolution,
so ``trainer.test`` evaluates one checkpoint at every resolution in one call (dataloader_idx i is
``eval_resolutions[i]``).
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Optional

import torch
import torchvision
from jsonargparse.typing import Path_fr
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from .datasets import EpochSampler, ImageTensorDataset, SubsetImageFolder, Transformed, find_idx, read_idx
from .transforms import TrainCrop, eval_transform, train_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_APT_ROOT = "/usr/share/datasets/fashion-mnist"


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
        eval_crop_pct: evaluation resizes to ``resolution / eval_crop_pct`` then center-crops.
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
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        crop: TrainCrop = "random_resized_crop",
        min_scale: float = 0.08,
        padding: int = 4,
        hflip: bool = True,
        randaugment_magnitude: Optional[int] = None,
        eval_resolutions: Optional[list[int]] = None,
        eval_crop_pct: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be a positive int")
        if eval_resolutions is not None and (not eval_resolutions or min(eval_resolutions) < 1):
            raise ValueError(f"eval_resolutions={eval_resolutions} must be a non-empty list of positive ints")
        self.root = Path(root)
        self.img_size = img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_tf = train_transform(
            img_size, self.mean, self.std, crop, min_scale, padding, hflip, randaugment_magnitude
        )
        self.eval_resolutions = list(eval_resolutions or [img_size])
        self.eval_crop_pct = eval_crop_pct
        self.train_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.start_epoch = 0

    @abc.abstractmethod
    def load(self, train: bool) -> Dataset:
        """The train or test split as raw (image, label) samples."""

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_set is None:
            self.train_set = self.load(train=True)
        if self.test_set is None:
            self.test_set = self.load(train=False)

    def state_dict(self) -> dict[str, int]:
        """The epoch a resumed fit starts in (saved in checkpoints)."""
        return {"epoch": self.trainer.fit_loop.epoch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.start_epoch = state_dict["epoch"]

    def train_dataloader(self) -> DataLoader:
        # Order and augmentations depend only on (seed, epoch, index), so resuming repeats them exactly.
        # A resumed fit creates its first iterator (and workers prefetch indices) before Lightning calls
        # set_epoch, hence the epoch from the checkpoint; the loader's own generator keeps iterator
        # creation from drawing on the global RNG.
        trainer = self.trainer
        sampler = EpochSampler(
            self.train_set,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )
        sampler.set_epoch(self.start_epoch)
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
        return self._eval_loader(self.img_size, persistent=True)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(r, persistent=False) for r in self.eval_resolutions]

    def _eval_loader(self, resolution: int, persistent: bool) -> DataLoader:
        tf = eval_transform(resolution, self.mean, self.std, self.eval_crop_pct)
        return DataLoader(
            Transformed(self.test_set, tf),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and self.num_workers > 0,
        )


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

    ``class_list`` is a text file with one class folder name per line (configs/imagenet100_classes.txt
    picks ImageNet-100 out of ImageNet); labels follow its order. Without it every class folder is used.
    """

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        train_dir: str = "train",
        val_dir: str = "val",
        class_list: Optional[Path_fr] = None,
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
