"""A 3D ViT on moving Fashion-MNIST garments: which way did it go first, and which way after?

Each clip is ``T`` frames of ``S x S`` pixels; a real Fashion-MNIST garment (resized to ``--garment``
pixels) starts at a random place and moves 1 or 2 pixels per frame (drawn, not labelled) in one
direction for the first half of the clip and in a direction for the second half (the same one or
another), wrapping around the frame edges (a torus, so it never leaves the frame, at any T or S).
The label is the ordered pair (first direction, second direction): 4 x 4 = 16 classes, chance 6.25%.
Each token (a tubelet of 2 frames) shows which way the garment moves locally, but only *when* each
motion happens orders the pair: without positions a model can at best tell the two directions apart
and guess their order (about 62.5%). Training clips use the training images, evaluation clips the
test images (never seen garments); everything is generated from fixed seeds.

`vit.NDRopeVisionTransformer(pos_embed, ndim=3, img_size=(T, S, S), patch_size=(2, p, p))` is trained with
``pos_embed`` in {learned, rope_axial, rope_mixed, none} (same budget, batches and seed), then
evaluated at the training size, at 2x and 4x more frames (temporal extrapolation; the turn is still
half-way) and at larger frames (same garment size and speed, so motion is the same in pixels). RoPE
models are evaluated with each `model.set_resolution_mode` mode: ``interpolate`` (positions rescaled
onto the training grid), ``extrapolate`` (integer indices) and ``ntk``.
Tokens are tubelets of 2 frames x p x p pixels (as ViViT / VideoMAE use): with 1-frame patches this
small model did not leave chance level (loss 2.09 vs ln 8 = 2.08 after 200 of 400 steps, on an earlier
direction-x-speed label that every encoding, ``none`` included, then solved at 99-100% with tubelets).

    python -m examples.video                  # default budget, writes reports/video/
    python -m examples.video --data-root DIR  # Fashion-MNIST gzip IDX files in DIR

Shapes: clips (B, 1, T, S, S) float in [0, 1]; labels (B,) int64.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vit

from .common import (
    FASHION_MNIST_ROOT,
    add_model_arguments,
    add_run_arguments,
    command_line,
    example_parser,
    load_fashion_mnist,
    setup_torch,
    train,
    write_report,
)

PosEmbed = Literal["learned", "rope_axial", "rope_mixed", "none"]
#: The position encodings the example trains, in table order.
POS_EMBEDS: tuple[str, ...] = get_args(PosEmbed)
#: Motion directions (dy, dx) per frame, label order: right, left, down, up.
DIRECTIONS: tuple[tuple[int, int], ...] = ((0, 1), (0, -1), (1, 0), (-1, 0))
DIRECTION_NAMES: tuple[str, ...] = ("right", "left", "down", "up")
#: Speeds in pixels per frame (a nuisance: drawn per clip, not part of the label).
SPEEDS: tuple[int, ...] = (1, 2)
NUM_CLASSES = len(DIRECTIONS) ** 2


def make_clips(
    garments: Tensor, frames: int, size: int, count: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``count`` clips (count, 1, frames, size, size) and labels (count,) of garments (G, g, g) in [0, 1].

    Clip i: garment ``garments[j]`` (j drawn), start (y0, x0) uniform over the frame, speed v, and
    directions d1, d2 drawn; between frames t and t + 1 the garment moves by ``v * DIRECTIONS[d1]``
    while t < frames // 2 and by ``v * DIRECTIONS[d2]`` after (modulo ``size``). Label ``d1 * 4 + d2``.
    """
    g = garments.shape[-1]
    if g > size:
        raise ValueError(f"garment size {g} must not exceed the frame size={size}")
    if frames < 2:
        raise ValueError(f"frames={frames} must be >= 2 (one turn half-way)")
    pick = torch.randint(0, garments.shape[0], (count,), generator=generator)
    first = torch.randint(0, len(DIRECTIONS), (count,), generator=generator)
    second = torch.randint(0, len(DIRECTIONS), (count,), generator=generator)
    speed = torch.tensor(SPEEDS)[torch.randint(0, len(SPEEDS), (count,), generator=generator)]
    start = torch.randint(0, size, (count, 2), generator=generator)
    canvas = F.pad(garments[pick], (0, size - g, 0, size - g))  # count, S, S: garment at the top-left
    table = torch.tensor(DIRECTIONS)
    step1, step2 = table[first] * speed[:, None], table[second] * speed[:, None]  # count, 2
    t = torch.arange(frames)
    before, after = t.clamp(max=frames // 2), (t - frames // 2).clamp(min=0)  # steps taken in each half
    offset = start[:, None, :] + before[None, :, None] * step1[:, None, :] + after[None, :, None] * step2[:, None, :]
    pixels = torch.arange(size)
    rows = (pixels[None, None, :] - offset[..., 0:1]) % size  # count, T, S
    cols = (pixels[None, None, :] - offset[..., 1:2]) % size
    index = torch.arange(count)[:, None, None, None]
    clips = canvas[index, rows[..., :, None], cols[..., None, :]]  # count, T, S, S
    return clips.unsqueeze(1), first * len(DIRECTIONS) + second


def prepare_garments(images: Tensor, size: int) -> Tensor:
    """uint8 (N, 28, 28) -> float (N, size, size) in [0, 1] (area resize)."""
    return F.interpolate(images[:, None].float() / 255.0, size=(size, size), mode="area")[:, 0]


def clip_batches(
    garments: Tensor, frames: int, size: int, batch: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless fresh training clips; the same seed gives the same stream."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield make_clips(garments, frames, size, batch, generator)


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    clips, labels = batch
    return F.cross_entropy(model(clips), labels)


@torch.no_grad()
def accuracy(model: nn.Module, clips: Tensor, labels: Tensor, batch: int) -> float:
    """Top-1 accuracy (%) of ``model`` on clips (N, 1, T, S, S)."""
    correct = 0
    for i in range(0, clips.shape[0], batch):
        correct += (model(clips[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum().item()
    return 100.0 * correct / clips.shape[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = example_parser("video", __doc__)
    parser.add_argument("--data-root", default=str(FASHION_MNIST_ROOT), help="folder with Fashion-MNIST gzip IDX files")
    parser.add_argument("--frames", type=int, default=8, help="T, frames per training clip")
    parser.add_argument("--size", type=int, default=24, help="S, training frame size (pixels)")
    parser.add_argument("--garment", type=int, default=12, help="garment size (pixels)")
    parser.add_argument("--patch", type=int, default=6, help="spatial patch size (pixels)")
    parser.add_argument("--tubelet", type=int, default=2, help="temporal patch size (frames)")
    parser.add_argument("--eval-frames", type=int, nargs="+", default=[16, 32], help="longer clips to evaluate")
    parser.add_argument("--eval-sizes", type=int, nargs="+", default=[36], help="larger frames to evaluate")
    parser.add_argument("--eval-clips", type=int, default=512, help="test clips per evaluation column")
    add_model_arguments(parser, dim=96, depth=3, heads=4, steps=600, batch=32,
                        item="clips", compared="encoding")
    parser.add_argument("--pos-embeds", nargs="+", default=list(POS_EMBEDS), choices=POS_EMBEDS,
                        help="position encodings to train")
    add_run_arguments(parser, "video")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train every position encoding, evaluate at longer clips and larger frames, write the report."""
    start = time.perf_counter()
    args = parse_args(argv)
    setup_torch(args.threads)
    sizes = [args.size, *args.eval_sizes]
    if any(s % args.patch for s in sizes):
        raise ValueError(f"--size and --eval-sizes {sizes} must be multiples of --patch={args.patch}")
    frames = [args.frames, *args.eval_frames]
    if any(t % args.tubelet for t in frames):
        raise ValueError(f"--frames and --eval-frames {frames} must be multiples of --tubelet={args.tubelet}")
    train_images, _ = load_fashion_mnist(args.data_root, "train")
    test_images, _ = load_fashion_mnist(args.data_root, "test")
    train_garments = prepare_garments(train_images, args.garment)
    test_garments = prepare_garments(test_images, args.garment)
    # evaluation settings: (label, frames, size); the first is the training size
    settings = [("train size", args.frames, args.size)]
    settings += [(f"T={t}", t, args.size) for t in args.eval_frames]
    settings += [(f"S={s}", args.frames, s) for s in args.eval_sizes]
    settings += [(f"T={t}, S={s}", t, s) for t in args.eval_frames[:1] for s in args.eval_sizes[:1]]
    eval_sets = {}
    for index, (label, frames, size) in enumerate(settings):
        generator = torch.Generator().manual_seed(10_000 + index)
        eval_sets[label] = make_clips(test_garments, frames, size, args.eval_clips, generator)
    columns = ["pos_embed", "mode", *[f"{label} (T={t}, S={s})" if label == "train size" else label
                                      for label, t, s in settings]]  # fmt: skip
    rows = []
    for pos_embed in args.pos_embeds:
        modes = ["interpolate", "extrapolate", "ntk"] if pos_embed.startswith("rope") else ["-"]
        per_seed: dict[str, list[list[float]]] = {mode: [] for mode in modes}  # mode -> per seed, per column
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = vit.NDRopeVisionTransformer(
                pos_embed,
                ndim=3,
                img_size=(args.frames, args.size, args.size),
                patch_size=(args.tubelet, args.patch, args.patch),
                in_chans=1,
                embed_dim=args.dim,
                depth=args.depth,
                num_heads=args.heads,
                num_classes=NUM_CLASSES,
            )
            t0 = time.perf_counter()
            batches = clip_batches(train_garments, args.frames, args.size, args.batch, seed)
            train(model, batches, classification_loss, steps=args.steps, lr=args.lr,
                  log_every=max(1, args.steps // 4), name=f"{pos_embed}/{seed}")  # fmt: skip
            for mode in modes:
                if mode != "-":
                    model.set_resolution_mode(mode)
                scores = [accuracy(model, *eval_sets[label], batch=64) for label, _, _ in settings]
                per_seed[mode].append(scores)
                print(f"  [{pos_embed}/{mode}/{seed}] {time.perf_counter() - t0:.0f}s {[round(v, 1) for v in scores]}")
        for mode in modes:
            runs = per_seed[mode]
            row = {"pos_embed": pos_embed, "mode": mode}
            row.update({column: sum(r[j] for r in runs) / len(runs) for j, column in enumerate(columns[2:])})
            first = [r[0] for r in runs]  # the training size, over seeds
            row["train size, min..max over seeds"] = f"{min(first):.1f}..{max(first):.1f}"
            row["per_seed"] = runs
            rows.append(row)

    def plot(figure) -> None:
        ax = figure.add_subplot(1, 1, 1)
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(settings))]
            ax.bar(xs, [row[c] for c in columns[2:]], width, label=f"{row['pos_embed']} ({row['mode']})")
        ax.axhline(100.0 / NUM_CLASSES, color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(settings)), [label for label, _, _ in settings])
        ax.set_ylabel("top-1 accuracy (%) on held-out garments")
        ax.set_title(f"3D ViT, direction before/after a turn; trained at T={args.frames}, S={args.size}")
        ax.set_ylim(0, 135)  # room for the legend above the bars
        ax.legend(fontsize=7, ncol=3, loc="upper center")

    notes = (
        f"Top-1 accuracy (%) over {NUM_CLASSES} classes (direction before x direction after the half-way turn; "
        f"chance {100 / NUM_CLASSES:.2f}%, order-blind best about 62.5%) on {args.eval_clips} clips per column "
        f"built from Fashion-MNIST *test* garments. Each model trained {args.steps} steps x {args.batch} clips "
        f"(T={args.frames}, S={args.size}, garment {args.garment}px, speeds {list(SPEEDS)} px/frame, patch "
        f"{args.tubelet}x{args.patch}x{args.patch}), seeds {args.seeds} (mean shown). `mode` is the RoPE coordinate rule at "
        "other grids (`model.set_resolution_mode`); `learned` is resampled to the new grid by timm."
    )
    wall = time.perf_counter() - start
    command = command_line("examples.video", argv)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    table_columns = [*columns, "train size, min..max over seeds"]
    write_report(args.out, title="Video: a 3D ViT on moving Fashion-MNIST garments", command=command,
                 columns=table_columns, rows=rows, config=config, wall_time_s=wall, notes=notes, plot=plot)  # fmt: skip
    print(f"wrote {Path(args.out) / 'report.md'} ({wall:.0f}s)")
    return {"rows": rows, "wall_time_s": wall, "columns": table_columns}


if __name__ == "__main__":
    main()
