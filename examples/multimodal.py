"""Image and text in one sequence: does the sentence describe the picture?

The image is a 2 x 2 mosaic of four real Fashion-MNIST garments (56 x 56 pixels, 8 x 8 patches of
7 x 7); the text is a short sentence about one quadrant, e.g. "the top left one is a sandal" or
"a sandal is the top left one". The label is whether it is true. Half the false sentences name a
garment that *is* in the mosaic, but in another quadrant, so the model must tie the words "top left"
to where the patches are, not only see which garments are there (chance 50%).

One transformer reads the packed sequence [64 image patches, text tokens], with q and k rotated by
`ndrope` and one of three position schemes (same model, budget, batches and seeds otherwise):

* ``mrope``: ``ndrope.multimodal_positions([(1, 8, 8), n_text], n_axes=3)`` with a 3-axis
  (t, h, w) axial RoPE, the Qwen2-VL M-RoPE rule: patches get (s, s + row, s + col), text tokens
  the same index on every axis, continuing after the image;
* ``flat``: one index per token over the packed sequence (0 .. N - 1) with 1D RoPE, as a text-only
  LLM would number an image flattened row by row;
* ``none``: no position encoding (a control: word order and patch places are invisible).

Training mosaics use the training images; evaluation mosaics the test images.

    python -m examples.multimodal                  # default budget, writes reports/multimodal/
    python -m examples.multimodal --data-root DIR  # Fashion-MNIST gzip IDX files in DIR

Shape alphabet: B batch, N = 64 + L tokens (L text), C width, H heads, D head dim, A = 3 axes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterator, Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ndrope

from .common import (
    FASHION_CLASSES,
    FASHION_MNIST_ROOT,
    Transformer,
    command_line,
    load_fashion_mnist,
    rotation,
    setup_torch,
    train,
    write_report,
)

Positions = Literal["mrope", "flat", "none"]
#: The position schemes the example compares, in table order.
POSITIONS: tuple[str, ...] = get_args(Positions)
QUADRANTS: tuple[tuple[str, str], ...] = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
#: Sentence templates; {v} vertical word, {h} horizontal word, {c} class name (one token each).
TEMPLATES: tuple[str, ...] = ("the {v} {h} one is a {c}", "a {c} is the {v} {h} one")
VOCAB: tuple[str, ...] = ("the", "one", "is", "a", "top", "bottom", "left", "right", *FASHION_CLASSES)
TEXT_LENGTH = 7  # every template has 7 words
PATCH = 7
GRID = (8, 8)  # patches of the 56 x 56 mosaic


def tokenize(sentence: str) -> list[int]:
    """Word ids of ``sentence`` (words of `VOCAB`, separated by spaces)."""
    try:
        return [VOCAB.index(word) for word in sentence.split()]
    except ValueError as error:
        raise ValueError(f"sentence {sentence!r} has a word outside VOCAB={VOCAB}") from error


def make_pairs(
    images: Tensor, labels: Tensor, count: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``count`` (mosaic, sentence, truth, elsewhere) samples: mosaics float (count, 56, 56) in [0, 1],
    token ids int64 (count, 7), truth int64 (count,) (1 = the sentence is true), elsewhere bool
    (count,) (a false sentence whose garment is in another quadrant).

    Half true; of the false ones, half name a class present in another quadrant (but not this one).
    """
    pick = torch.randint(0, images.shape[0], (count, 4), generator=generator)
    tiles = images[pick].float() / 255.0  # count, 4, 28, 28
    mosaic = tiles.view(count, 2, 2, 28, 28).permute(0, 1, 3, 2, 4).reshape(count, 56, 56)
    classes = labels[pick]  # count, 4 (quadrant order: TL, TR, BL, BR)
    quadrant = torch.randint(0, 4, (count,), generator=generator)
    template = torch.randint(0, len(TEMPLATES), (count,), generator=generator)
    kind = torch.randint(0, 4, (count,), generator=generator)  # 0, 1: true; 2: other quadrant; 3: any other
    random_class = torch.randint(0, len(FASHION_CLASSES), (count, 8), generator=generator)
    random_quadrant = torch.randint(0, 4, (count, 8), generator=generator)
    tokens, truth, elsewhere = [], [], []
    for i in range(count):
        target = int(classes[i, quadrant[i]])
        named = target
        if kind[i] >= 2:
            candidates = [int(classes[i, q]) for q in random_quadrant[i]] if kind[i] == 2 else []
            candidates += [int(c) for c in random_class[i]]
            named = next((c for c in candidates if c != target), (target + 1) % len(FASHION_CLASSES))
        v, h = QUADRANTS[int(quadrant[i])]
        tokens.append(tokenize(TEMPLATES[int(template[i])].format(v=v, h=h, c=FASHION_CLASSES[named])))
        truth.append(int(named == target))
        elsewhere.append(named != target and named in classes[i].tolist())
    return mosaic, torch.tensor(tokens), torch.tensor(truth), torch.tensor(elsewhere)


def pair_batches(images: Tensor, labels: Tensor, batch: int, seed: int) -> Iterator[tuple[Tensor, ...]]:
    """Endless fresh training samples (`make_pairs`); the same seed gives the same stream."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield make_pairs(images, labels, batch, generator)


class PackedClassifier(nn.Module):
    """Reads [image patches, text tokens] as one sequence and says whether the text fits the image.

    Forward: mosaics (B, 56, 56), tokens (B, L) -> logits (B, 2).
    """

    def __init__(self, positions: Positions, *, dim: int, depth: int, num_heads: int, theta: float) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} is not supported; choose one of {list(POSITIONS)}")
        self.positions = positions
        self.patch_embed = nn.Linear(PATCH * PATCH, dim)
        self.word_embed = nn.Embedding(len(VOCAB), dim)
        self.modality = nn.Parameter(torch.zeros(2, dim))  # image, text
        self.transformer = Transformer(dim, depth, num_heads)
        self.head = nn.Linear(dim, 2)
        n_axes = 3 if positions == "mrope" else 1
        freqs = ndrope.axial_frequencies(dim // num_heads, n_axes, theta=theta, dtype=torch.float64)  # A, P
        self.register_buffer("freqs", freqs, persistent=False)

    def token_positions(self, text_length: int) -> Tensor:
        """(N, A) positions of the packed sequence: M-RoPE's 3 axes, or one flat index."""
        if self.positions == "mrope":
            return ndrope.multimodal_positions([(1, *GRID), text_length], n_axes=3)
        return ndrope.grid((GRID[0] * GRID[1] + text_length,))

    def forward(self, mosaics: Tensor, tokens: Tensor) -> Tensor:
        B = mosaics.shape[0]
        patches = mosaics.view(B, GRID[0], PATCH, GRID[1], PATCH).permute(0, 1, 3, 2, 4).reshape(B, -1, PATCH * PATCH)
        x = torch.cat((self.patch_embed(patches) + self.modality[0], self.word_embed(tokens) + self.modality[1]), 1)
        rope = None
        if self.positions != "none":
            rope = rotation(self.token_positions(tokens.shape[1]).to(x.device), self.freqs)  # N, P
        return self.head(self.transformer(x, rope=rope).mean(dim=1))


def pair_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    mosaics, tokens, truth, _ = batch
    return F.cross_entropy(model(mosaics, tokens), truth)


@torch.no_grad()
def scores(model: nn.Module, samples: tuple[Tensor, ...], batch: int = 256) -> dict[str, float]:
    """Accuracy (%) on `make_pairs` samples: all, true sentences, false sentences naming a garment
    that is elsewhere in the mosaic, and the other false sentences."""
    mosaics, tokens, truth, elsewhere = samples
    predictions = torch.cat([model(mosaics[i : i + batch], tokens[i : i + batch]).argmax(-1)
                             for i in range(0, truth.shape[0], batch)])  # fmt: skip
    correct = (predictions == truth).float()
    subsets = {"all": truth >= 0, "true": truth == 1, "false, elsewhere": elsewhere,
               "false, absent": (truth == 0) & ~elsewhere}  # fmt: skip
    return {name: 100.0 * correct[mask].mean().item() if mask.any() else float("nan") for name, mask in subsets.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.multimodal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(FASHION_MNIST_ROOT), help="folder with Fashion-MNIST gzip IDX files")
    parser.add_argument("--eval-pairs", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--theta", type=float, default=100.0, help="RoPE base (both schemes)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/multimodal")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train every position scheme for every seed, evaluate on test-image mosaics, write the report."""
    start = time.perf_counter()
    args = parse_args(argv)
    setup_torch(args.threads)
    train_images, train_labels = load_fashion_mnist(args.data_root, "train")
    test_images, test_labels = load_fashion_mnist(args.data_root, "test")
    eval_set = make_pairs(test_images, test_labels, args.eval_pairs, torch.Generator().manual_seed(10_000))
    curves: dict[str, list[list[float]]] = {}
    rows = []
    for positions in args.positions:
        per_seed: list[dict[str, float]] = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = PackedClassifier(positions, dim=args.dim, depth=args.depth, num_heads=args.heads, theta=args.theta)
            t0 = time.perf_counter()
            losses = train(model, pair_batches(train_images, train_labels, args.batch, seed), pair_loss,
                           steps=args.steps, lr=args.lr, log_every=max(1, args.steps // 4), name=f"{positions}/{seed}")  # fmt: skip
            curves.setdefault(positions, []).append(losses)
            per_seed.append(scores(model, eval_set))
            print(f"  [{positions}/{seed}] {time.perf_counter() - t0:.0f}s {per_seed[-1]}", flush=True)
        accuracies = [s["all"] for s in per_seed]
        rows.append({
            "positions": positions,
            **{f"{k} (%)": sum(s[k] for s in per_seed) / len(per_seed) for k in per_seed[0]},
            "min..max over seeds": f"{min(accuracies):.1f}..{max(accuracies):.1f}",
            "per_seed": per_seed,
        })  # fmt: skip

    def plot(figure) -> None:
        ax = figure.add_subplot(1, 1, 1)
        window = max(1, args.steps // 20)
        for positions, runs in curves.items():
            for seed, losses in zip(args.seeds, runs):
                smooth = torch.tensor(losses).unfold(0, window, 1).mean(1) if len(losses) >= window else torch.tensor(losses)
                ax.plot(range(len(smooth)), smooth, label=f"{positions} seed {seed}", lw=1)
        ax.axhline(0.6931, color="grey", ls=":", lw=1, label="chance (ln 2)")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"training loss (moving mean over {window} steps)")
        ax.set_title("Packed image + text: M-RoPE vs flat 1D positions vs none")
        ax.legend(fontsize=8)

    columns = ["positions", "all (%)", "min..max over seeds", "true (%)", "false, elsewhere (%)", "false, absent (%)"]
    notes = (
        f"Accuracy on {args.eval_pairs} (mosaic, sentence) pairs built from Fashion-MNIST *test* images "
        f"(chance 50%), mean over seeds {args.seeds}; then accuracy on the true sentences, on the false ones "
        f"naming a garment that is in another quadrant (position needed), and on the other false ones. Each run trained {args.steps} steps x {args.batch} pairs; width {args.dim}, depth "
        f"{args.depth}, {args.heads} heads, RoPE theta {args.theta:g} for both schemes."
    )
    wall = time.perf_counter() - start
    command = command_line("examples.multimodal", argv)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_report(args.out, title="Multimodal: one packed sequence of image patches and text", command=command,
                 columns=columns, rows=rows, config=config, wall_time_s=wall, notes=notes, plot=plot)  # fmt: skip
    print(f"wrote {Path(args.out) / 'report.md'} ({wall:.0f}s)")
    return {"rows": rows, "wall_time_s": wall, "columns": columns}


if __name__ == "__main__":
    main()
