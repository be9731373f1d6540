"""What the three examples share: a small transformer whose attention takes `ndrope` rotations, a
training loop, the Fashion-MNIST reader, and the report writer (Markdown + JSON table, PNG plot).

Shape alphabet: B batch, H heads, N tokens, C width, D = C / H channels per head, P rotated pairs.
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
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ndrope
from training import idx

#: Where the Debian-style Fashion-MNIST install lives (gzip IDX files).
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST label names, in label order.
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip


# ----------------------------------------------------------------------------- run helpers


def add_run_arguments(parser: argparse.ArgumentParser, name: str, *, seeds: Sequence[int] = (0,)) -> None:
    """The options every example shares: ``--seeds``, ``--threads`` and ``--out`` (``reports/<name>``)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="one training run per seed and encoding")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see README)")
    parser.add_argument("--out", default=f"reports/{name}")


def setup_torch(threads: int) -> None:
    """Use ``threads`` CPU threads (the examples are sized for 2 cores)."""
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    torch.set_num_threads(threads)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, for the report."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, ...]],
    loss_fn: Callable[[nn.Module, tuple[Tensor, ...]], Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup: int | None = None,
    log_every: int = 0,
    name: str = "",
) -> list[float]:
    """AdamW with warm-up + cosine decay and gradient clipping at 1; returns the loss of every step.

    ``batches`` yields as many batches as ``steps`` asks for; ``loss_fn(model, batch)`` returns a scalar.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "freqs" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "freqs" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 20) if warmup is None else warmup
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        loss = loss_fn(model, next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
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


# ----------------------------------------------------------------------------- the transformer


def rotation(positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin) in float32 of the angles ``positions @ freqs``, computed once per forward.

    positions (N, A) or (B, N, A); freqs (A, P) shared by the heads. Returns (N, P) or (B, 1, N, P),
    which broadcast against q, k (B, H, N, D).
    """
    cos, sin = ndrope.cos_sin(ndrope.angles(positions, freqs))
    if positions.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos.float(), sin.float()


class Attention(nn.Module):
    """Multi-head self-attention that applies what it is handed: a rotation for q and k
    (`ndrope.apply_rotary`), an additive bias on the logits (ALiBi), and/or a causal mask."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, bias: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # B, H, N, D
        if rope is not None:
            q = ndrope.apply_rotary(q, rope, layout="half")
            k = ndrope.apply_rotary(k, rope, layout="half")
        if bias is not None and causal:
            future = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)
            bias = bias.masked_fill(future, float("-inf"))
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, bias: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, bias, causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``depth`` blocks sharing one rotation / bias per forward, then a final LayerNorm. x (B, N, C)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, bias: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        for block in self.blocks:
            x = block(x, rope, bias, causal)
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


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


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and `os.replace`, so a
    reader (or a crash) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``; floats with 3 decimals."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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
        f"{markdown_table(columns, rows)}\n{notes.strip()}\n"
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
