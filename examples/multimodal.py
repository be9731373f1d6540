"""Image and text in one sequence: "what is top left ?" about a mosaic of four garments.

The image is a 2 x 2 mosaic of four real Fashion-MNIST garments, each resized to 14 x 14 (28 x 28
pixels, 4 x 4 patches of 7 x 7); the text is a short question about one quadrant, "what is top left ?" or "top left is what ?".
The answer is the class of the garment in that quadrant (10 classes). Four garments are shown, so
seeing which garments are there is not enough: the model must tie the words "top left" to where
the patches are (a model that picks one of the four at random scores about 25% + luck).

One transformer (`vit.RopeBlock` with `vit.RopeAttention`) reads the packed sequence [16 image
patches, 5 text tokens], with q and k rotated by `ndrope`, and answers from the output of the last
token ("?"). Three position schemes, same model, budget, batches and seeds otherwise:

* ``mrope``: ``ndrope.multimodal_positions([(1, 4, 4), 5], n_axes=3)`` with a 3-axis (t, h, w) axial
  RoPE, the Qwen2-VL M-RoPE rule: patches get (s, s + row, s + col), text tokens the same index on
  every axis, continuing after the image;
* ``flat``: one index per token over the packed sequence (0 .. N - 1) with 1D RoPE, as a text-only
  LLM would number an image flattened row by row;
* ``none``: no position encoding (a control: patch places and word order are invisible).

Training mosaics use the training images; evaluation mosaics the test images.

    python -m examples.multimodal                  # default budget, writes reports/multimodal/
    python -m examples.multimodal --data-root DIR  # Fashion-MNIST gzip IDX files in DIR

Shape alphabet: B batch, N = 16 + L tokens (L = 5 text), C width, H heads, D head dim, A = 3 axes.
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

import ndrope

from .common import (
    FASHION_CLASSES,
    FASHION_MNIST_ROOT,
    add_model_arguments,
    add_run_arguments,
    command_line,
    example_parser,
    load_fashion_mnist,
    rope_blocks,
    setup_torch,
    train,
    write_report,
)

Positions = Literal["mrope", "flat", "none"]
#: The position schemes the example compares, in table order.
POSITIONS: tuple[str, ...] = get_args(Positions)
QUADRANTS: tuple[tuple[str, str], ...] = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
#: Question templates; {v} vertical word, {h} horizontal word.
TEMPLATES: tuple[str, ...] = ("what is {v} {h} ?", "{v} {h} is what ?")
VOCAB: tuple[str, ...] = ("what", "is", "?", "top", "bottom", "left", "right")
TEXT_LENGTH = 5  # every template has 5 words
GARMENT = 14  # pixels per garment (Fashion-MNIST's 28 resized)
PATCH = 7
GRID = (2 * GARMENT // PATCH, 2 * GARMENT // PATCH)  # patches of the mosaic


def tokenize(sentence: str) -> list[int]:
    """Word ids of ``sentence`` (words of `VOCAB`, separated by spaces)."""
    try:
        return [VOCAB.index(word) for word in sentence.split()]
    except ValueError as error:
        raise ValueError(f"sentence {sentence!r} has a word outside VOCAB={VOCAB}") from error


def make_questions(
    images: Tensor, labels: Tensor, count: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``count`` (mosaic, question, answer, classes) samples: mosaics float (count, 28, 28) in [0, 1],
    token ids int64 (count, 5), answer int64 (count,) (the class in the asked quadrant), and the
    classes of all four quadrants int64 (count, 4) (order: top left, top right, bottom left, bottom right).
    """
    pick = torch.randint(0, images.shape[0], (count, 4), generator=generator)
    tiles = F.interpolate(images[pick].float() / 255.0, size=(GARMENT, GARMENT), mode="area")  # count, 4, g, g
    mosaic = tiles.view(count, 2, 2, GARMENT, GARMENT).permute(0, 1, 3, 2, 4).reshape(count, 2 * GARMENT, 2 * GARMENT)
    classes = labels[pick]  # count, 4
    quadrant = torch.randint(0, 4, (count,), generator=generator)
    template = torch.randint(0, len(TEMPLATES), (count,), generator=generator)
    tokens = [
        tokenize(TEMPLATES[int(t)].format(v=QUADRANTS[int(q)][0], h=QUADRANTS[int(q)][1]))
        for q, t in zip(quadrant, template)
    ]
    return mosaic, torch.tensor(tokens), classes.gather(1, quadrant[:, None])[:, 0], classes


def question_batches(images: Tensor, labels: Tensor, batch: int, seed: int) -> Iterator[tuple[Tensor, ...]]:
    """Endless fresh training samples (`make_questions`); the same seed gives the same stream."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield make_questions(images, labels, batch, generator)


class PackedClassifier(nn.Module):
    """Reads [image patches, text tokens] as one sequence and answers from the last token's output.

    Forward: mosaics (B, 28, 28), tokens (B, L) -> logits (B, 10) over the garment classes.
    """

    def __init__(self, positions: Positions, *, dim: int, depth: int, num_heads: int, theta: float) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} is not supported; choose one of {list(POSITIONS)}")
        self.positions = positions
        self.patch_embed = nn.Linear(PATCH * PATCH, dim)
        self.word_embed = nn.Embedding(len(VOCAB), dim)
        self.modality = nn.Parameter(torch.zeros(2, dim))  # image, text
        self.blocks = rope_blocks(dim, depth, num_heads)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(FASHION_CLASSES))
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
        if self.positions != "none":  # (cos, sin), each (N, P), once per forward
            rope = ndrope.cos_sin(ndrope.angles(self.token_positions(tokens.shape[1]).to(x.device), self.freqs))
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.head(self.norm(x)[:, -1])


def answer_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    mosaics, tokens, answers, _ = batch
    return F.cross_entropy(model(mosaics, tokens), answers)


@torch.no_grad()
def scores(model: nn.Module, samples: tuple[Tensor, ...], batch: int = 256) -> dict[str, float]:
    """On `make_questions` samples, in %: ``correct`` answers; ``wrong quadrant``: a wrong answer that is
    the class of another garment of the mosaic (seen, but not located); ``other``: the remaining answers."""
    mosaics, tokens, answers, classes = samples
    predictions = torch.cat([model(mosaics[i : i + batch], tokens[i : i + batch]).argmax(-1)
                             for i in range(0, answers.shape[0], batch)])  # fmt: skip
    correct = predictions == answers
    elsewhere = ~correct & (predictions[:, None] == classes).any(dim=1)
    return {"correct": 100.0 * correct.float().mean().item(), "wrong quadrant": 100.0 * elsewhere.float().mean().item(),
            "other": 100.0 * (~correct & ~elsewhere).float().mean().item()}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = example_parser("multimodal", __doc__)
    parser.add_argument("--data-root", default=str(FASHION_MNIST_ROOT), help="folder with Fashion-MNIST gzip IDX files")
    parser.add_argument("--eval-questions", type=int, default=2000, help="questions about test-image mosaics")
    parser.add_argument("--theta", type=float, default=100.0, help="RoPE base (both schemes)")
    add_model_arguments(parser, dim=96, depth=3, heads=4, steps=1500, batch=32,
                        item="questions", compared="scheme")
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS,
                        help="position schemes to train")
    add_run_arguments(parser, "multimodal", seeds=(0, 1))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train every position scheme for every seed, evaluate on test-image mosaics, write the report."""
    start = time.perf_counter()
    args = parse_args(argv)
    setup_torch(args.threads)
    train_images, train_labels = load_fashion_mnist(args.data_root, "train")
    test_images, test_labels = load_fashion_mnist(args.data_root, "test")
    eval_set = make_questions(test_images, test_labels, args.eval_questions, torch.Generator().manual_seed(10_000))
    curves: dict[str, list[list[float]]] = {}
    rows = []
    for positions in args.positions:
        per_seed: list[dict[str, float]] = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = PackedClassifier(positions, dim=args.dim, depth=args.depth, num_heads=args.heads, theta=args.theta)
            t0 = time.perf_counter()
            losses = train(model, question_batches(train_images, train_labels, args.batch, seed), answer_loss,
                           steps=args.steps, lr=args.lr, log_every=max(1, args.steps // 4), name=f"{positions}/{seed}")  # fmt: skip
            curves.setdefault(positions, []).append(losses)
            per_seed.append(scores(model, eval_set))
            print(f"  [{positions}/{seed}] {time.perf_counter() - t0:.0f}s {per_seed[-1]}", flush=True)
        accuracies = [s["correct"] for s in per_seed]
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
        ax.axhline(2.3026, color="grey", ls=":", lw=1, label="chance (ln 10)")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"training loss (moving mean over {window} steps)")
        ax.set_title("Packed image + question: M-RoPE vs flat 1D positions vs none")
        ax.legend(fontsize=8)

    columns = ["positions", "correct (%)", "min..max over seeds", "wrong quadrant (%)", "other (%)"]
    notes = (
        f"Answers to {args.eval_questions} questions about mosaics of Fashion-MNIST *test* images (10 classes), "
        f"mean over seeds {args.seeds}: `correct`; `wrong quadrant`: the answer is another garment of the mosaic "
        f"(seen but not located); `other`: any other wrong answer. Each run trained {args.steps} steps x "
        f"{args.batch} questions; width {args.dim}, depth {args.depth}, {args.heads} heads, RoPE theta "
        f"{args.theta:g} for both schemes."
    )
    wall = time.perf_counter() - start
    command = command_line("examples.multimodal", argv)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_report(args.out, title="Multimodal: one packed sequence of image patches and a question", command=command,
                 columns=columns, rows=rows, config=config, wall_time_s=wall, notes=notes, plot=plot)  # fmt: skip
    print(f"wrote {Path(args.out) / 'report.md'} ({wall:.0f}s)")
    return {"rows": rows, "wall_time_s": wall, "columns": columns}


if __name__ == "__main__":
    main()
