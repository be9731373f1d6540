"""What the three examples share besides the library: their command-line options, the training loop
(AdamW with `training.schedule.warmup_cosine`), the Fashion-MNIST reader (`training.idx`) and the
report (Markdown + JSON table written by `training.files`, PNG plot), and the transformer blocks of
the text and multimodal models (`vit.RopeBlock`). No lightning.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training import idx
from training.files import atomic_write, markdown_table
from training.schedule import warmup_cosine
from vit import RopeAttention, RopeBlock

#: Where the Debian-style Fashion-MNIST install lives (gzip IDX files).
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST label names, in label order.
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip


# ----------------------------------------------------------------------------- run helpers


def example_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The command line of ``python -m examples.<name>``: the first paragraph of ``doc``, and every option's
    default in ``--help`` (options without a default or help text show none)."""
    return argparse.ArgumentParser(prog=f"python -m examples.{name}", description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_run_arguments(parser: argparse.ArgumentParser, name: str, *, seeds: Sequence[int] = (0,)) -> None:
    """The options every example shares: ``--seeds``, ``--threads`` and ``--out`` (``reports/<name>``)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="one training run per seed and encoding")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see README)")
    parser.add_argument("--out", default=f"reports/{name}", help="report folder")


def add_model_arguments(parser: argparse.ArgumentParser, *, dim: int, depth: int, heads: int, steps: int, batch: int,
                        item: str, compared: str, lr: float = 2e-3) -> None:
    """The model and training options every example has: ``--dim``, ``--depth``, ``--heads``, ``--steps``,
    ``--batch`` (``item``: what a batch holds) and ``--lr``; ``compared``: what the example compares."""
    parser.add_argument("--dim", type=int, default=dim, help="model width")
    parser.add_argument("--depth", type=int, default=depth, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=heads, help="attention heads")
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps per {compared} and seed")
    parser.add_argument("--batch", type=int, default=batch, help=f"{item} per training step")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW, warmup + cosine)")


def setup_torch(threads: int) -> None:
    """Use ``threads`` CPU threads (the examples are sized for 2 cores)."""
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    torch.set_num_threads(threads)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, for the report."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


# ----------------------------------------------------------------------------- training


#: AdamW weight decay, applied to weight matrices only (not to biases, norms or RoPE frequencies).
WEIGHT_DECAY = 0.05
#: `warmup_cosine` decays the learning rate to this fraction of ``lr``.
MIN_LR_RATIO = 0.1


def train(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, ...]],
    loss_fn: Callable[[nn.Module, tuple[Tensor, ...]], Tensor],
    *,
    steps: int,
    lr: float,
    log_every: int = 0,
    name: str = "",
) -> list[float]:
    """AdamW (betas 0.9, 0.95) with gradient clipping at 1 and `training.schedule.warmup_cosine` per step
    (linear warm-up over the first 5% of the steps, cosine decay to ``MIN_LR_RATIO * lr``); returns the
    loss of every step.

    ``batches`` yields as many batches as ``steps`` asks for; ``loss_fn(model, batch)`` returns a scalar.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "freqs" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "freqs" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=warmup, total_steps=steps, min_ratio=MIN_LR_RATIO)
    )
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = loss_fn(model, next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            recent = losses[-log_every:]
            print(
                f"  [{name}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    return losses


# ----------------------------------------------------------------------------- model


def rope_blocks(dim: int, depth: int, num_heads: int) -> nn.ModuleList:
    """``depth`` pre-norm blocks, each `vit.RopeBlock` with `vit.RopeAttention` (qkv bias, ``nn.LayerNorm``,
    MLP ratio 4), whose forward ``block(x, rope=..., attn_mask=...)`` takes x (B, N, C) and the rotation and
    additive logit mask computed once per forward. Linear weights start from a normal of std 0.02
    (`nn.init.trunc_normal_`, bounds +-2), biases at zero.
    """
    if dim % num_heads:
        raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    blocks = nn.ModuleList(
        RopeBlock(dim, num_heads, qkv_bias=True, norm_layer=nn.LayerNorm, attn_layer=RopeAttention)
        for _ in range(depth)
    )
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return blocks


# ----------------------------------------------------------------------------- data


def read_idx(path: str | os.PathLike) -> Tensor:
    """A uint8 IDX file (plain or ``.gz``), as MNIST and Fashion-MNIST ship them: the tensor it stores
    (read by `training.idx`, which needs neither lightning nor torchvision)."""
    array = idx.read_idx(path)
    if array.dtype != np.uint8:
        raise ValueError(f"{path} holds {array.dtype} values; Fashion-MNIST images and labels are uint8")
    return torch.from_numpy(array)


def load_fashion_mnist(root: str | os.PathLike, split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ("train" or "test") from its IDX files in ``root`` (``.gz`` or not):
    uint8 images (N, 28, 28), int64 labels (N,).

    Raises FileNotFoundError naming the files and the default folder when they are missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    paths = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found = idx.find_idx(root, stem)  # root/stem[.gz] or torchvision's root/FashionMNIST/raw/stem[.gz]
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} file {stem}[.gz] not found in data_root={str(root)!r}; the default "
                f"{FASHION_MNIST_ROOT} comes from Debian: apt-get update && apt-get install -y dataset-fashion-mnist"
            )
        paths.append(found)
    images, labels = read_idx(paths[0]), read_idx(paths[1]).long()
    if images.dim() != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{paths[0]}: expected images (N, h, w) and N labels, got {tuple(images.shape)}, {tuple(labels.shape)}")
    return images, labels


# ----------------------------------------------------------------------------- reports


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def report_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table (`training.files.markdown_table`) of ``rows`` (dicts) restricted to ``columns``;
    floats with 3 decimals, NaN as ``n/a``."""
    return markdown_table(columns, [[_cell(row.get(c, "")) for c in columns] for row in rows])


def write_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    command: str,
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    config: dict[str, Any],
    wall_time_s: float,
    notes: str,
    plot: Callable[[Any], None],
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``plot.png`` into ``out_dir`` (each atomically).

    ``plot(figure)`` draws on a fresh matplotlib figure. Returns the three paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = {"md": out / "report.md", "json": out / "report.json", "png": out / "plot.png"}
    environment = f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.machine()}"
    cpu_time_s = time.process_time()  # all threads of this process: a load-independent cost measure
    md = (
        f"# {title}\n\nCommand: `{command}`\n\nWall time: {wall_time_s:.0f} s, process CPU time: "
        f"{cpu_time_s:.0f} s ({environment})\n\n"
        f"{report_table(columns, rows)}\n{notes.strip()}\n"
    )
    record = {
        "title": title,
        "command": command,
        "wall_time_s": round(wall_time_s, 1),
        "cpu_time_s": round(cpu_time_s, 1),
        "environment": environment,
        "config": config,
        "columns": list(columns),
        "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
    }
    figure = plt.figure(figsize=(7.5, 4.5))
    try:
        plot(figure)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(figure)
    atomic_write(paths["png"], buffer.getvalue())
    atomic_write(paths["json"], json.dumps(record, indent=2) + "\n")
    atomic_write(paths["md"], md)
    return paths
