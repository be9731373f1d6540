"""Train short, test long: a byte-level causal language model whose attention uses `ndrope`.

The corpus is the Python standard library's own source (``<stdlib>/*.py``): real text (code and
English docstrings/comments, about 5 MB) that every Python install carries, so nothing is downloaded
and nothing needs root. Files are split by name: every ``--eval-every``-th file (sorted order) is
held out for evaluation, the rest is training text, so evaluation text is never trained on.

Each position encoding trains the same model (same width, depth, steps, batches and seed) at context
``--context`` and is evaluated in bits per byte at 1x, 2x, 4x and 8x that context, on the same
held-out bytes cut into windows of that length (every token of every window counts):

* ``nope``: no position encoding, causal mask only;
* ``learned``: learned absolute table of ``context`` rows (positions beyond it reuse the last row);
* ``sinusoidal``: Vaswani et al.'s fixed sin/cos table, for any position;
* ``alibi``: ALiBi linear bias ``-m_h * (i - j)`` (Press et al.);
* ``rope``: RoPE, ``ndrope.axial_frequencies(head_dim, 1, theta=...)`` rotating q and k, evaluated as is,
  then with eval-time context scaling at ``s = length / context``: position interpolation (``+pi``,
  positions divided by s), NTK-aware scaling (``+ntk``, ``ndrope.ntk_scaled_frequencies``) and YaRN
  (``+yarn``, ``ndrope.recipes.yarn``);
* ``p-rope``: p-RoPE (Barbero et al., 2024): only the fastest fraction ``p`` of the frequencies
  rotate, the slowest ``1 - p`` are set to 0 (those channels carry no position).

    python -m examples.text_lm                     # default budget, writes reports/text_lm/
    python -m examples.text_lm --steps 50 --eval-bytes 8192  # a smoke run

The model is built from the library: `vit.RopeBlock` / `vit.RopeAttention` (timm's pre-norm block,
which applies the rotation and the logit bias it is handed), `vit.sincos_embed` and `vit.AlibiBias`.

Shape alphabet: B batch, N tokens, C width, H heads, D head dim, P = D // 2 pairs.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ndrope
from ndrope import recipes
from vit import AlibiBias, sincos_embed

from .common import (
    add_model_arguments,
    add_run_arguments,
    command_line,
    example_parser,
    rope_blocks,
    setup_torch,
    train,
    write_report,
)

Encoding = Literal["nope", "learned", "sinusoidal", "alibi", "rope", "p-rope"]
#: Every position encoding the example trains, in table order.
ENCODINGS: tuple[str, ...] = get_args(Encoding)
Scaling = Literal["none", "pi", "ntk", "yarn"]
#: Eval-time context scaling applied to the RoPE model (``none`` = RoPE as trained): ``pi`` and ``ntk``
#: from the core (`ndrope.grid` with ``reference_shape``, `ndrope.ntk_scaled_frequencies`), ``yarn``
#: from `ndrope.recipes`.
SCALINGS: tuple[str, ...] = get_args(Scaling)
#: Eval lengths as multiples of the training context.
LENGTH_FACTORS: tuple[int, ...] = (1, 2, 4, 8)


# ----------------------------------------------------------------------------- data


def stdlib_dir() -> Path:
    """The folder of this interpreter's standard library (``sysconfig`` "stdlib")."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(corpus_dir: str | Path, eval_every: int) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Bytes of the ``*.py`` files of ``corpus_dir``, split by file: every ``eval_every``-th file
    (sorted by name, starting with the first) is evaluation text. Returns uint8 (train, eval) tensors
    and the two lists of file names."""
    if eval_every < 2:
        raise ValueError(f"eval_every={eval_every} must be >= 2 (one file in eval_every is held out)")
    files = sorted(Path(corpus_dir).glob("*.py"))
    if len(files) < 2:
        raise FileNotFoundError(
            f"corpus_dir={str(corpus_dir)!r} has {len(files)} *.py files; need at least 2 "
            f"(the default is this Python's standard library, {stdlib_dir()})"
        )
    held_out = [f for i, f in enumerate(files) if i % eval_every == 0]
    training = [f for i, f in enumerate(files) if i % eval_every != 0]

    def read(paths: list[Path]) -> Tensor:
        data = b"\n".join(p.read_bytes() for p in paths)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    return read(training), read(held_out), [f.name for f in training], [f.name for f in held_out]


def random_windows(data: Tensor, length: int, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs, targets) int64 (B, length) from random offsets; the same seed gives the same batches."""
    if data.numel() <= length + 1:
        raise ValueError(f"training text has {data.numel()} bytes, fewer than context + 1 = {length + 1}")
    generator = torch.Generator().manual_seed(seed)
    steps = torch.arange(length + 1)
    while True:
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
        window = data[starts[:, None] + steps].long()
        yield window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------- model


def causal_mask(n: int, device: torch.device) -> Tensor:
    """Additive logit mask (N, N): 0 where key j <= query i, -inf above the diagonal (the future)."""
    return torch.full((n, n), float("-inf"), device=device).triu(1)


class ByteLM(nn.Module):
    """Causal byte-level transformer LM with a selectable position encoding.

    Forward: idx int64 (B, N) -> logits (B, N, 256), at any N (longer than ``context`` too).
    """

    def __init__(
        self,
        encoding: Encoding,
        *,
        context: int,
        dim: int,
        depth: int,
        num_heads: int,
        theta: float = 10000.0,
        p: float = 0.75,
    ) -> None:
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding={encoding!r} is not supported; choose one of {list(ENCODINGS)}")
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p={p} must be in (0, 1] (the fraction of RoPE frequencies kept by p-RoPE)")
        self.encoding, self.context, self.theta = encoding, context, theta
        self.scaling: Scaling = "none"
        self.embed = nn.Embedding(256, dim)
        self.blocks = rope_blocks(dim, depth, num_heads)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)
        self.table = nn.Parameter(torch.randn(context, dim) * 0.02) if encoding == "learned" else None
        self.alibi = AlibiBias(num_heads) if encoding == "alibi" else None
        freqs = ndrope.axial_frequencies(dim // num_heads, 1, theta=theta, dtype=torch.float64)  # (1, P)
        if encoding == "p-rope":
            keep = round(p * freqs.shape[-1])
            freqs[:, keep:] = 0.0  # the slowest 1 - p frequencies: NoPE channels
        self.register_buffer("freqs", freqs, persistent=False)

    def set_scaling(self, scaling: Scaling) -> None:
        """Eval-time context scaling of the RoPE angles beyond ``context`` tokens (RoPE models only)."""
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r} is not supported; choose one of {list(SCALINGS)}")
        if scaling != "none" and self.encoding != "rope":
            raise ValueError(f"scaling={scaling!r} applies to the plain RoPE model only, not encoding={self.encoding!r}")
        self.scaling = scaling

    def rope(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin) (N, P) for positions 0..n-1, with the eval-time scaling at s = n / context > 1."""
        scale = n / self.context
        positions, freqs = ndrope.grid((n,), device=device), self.freqs
        if self.scaling == "none" or scale <= 1:
            return ndrope.cos_sin(ndrope.angles(positions, freqs))
        if self.scaling == "pi":  # position interpolation: i * context / n
            positions = ndrope.grid((n,), reference_shape=(self.context,), device=device)
            return ndrope.cos_sin(ndrope.angles(positions, freqs))
        if self.scaling == "ntk":
            return ndrope.cos_sin(ndrope.angles(positions, ndrope.ntk_scaled_frequencies(freqs, [scale])))
        recipe = recipes.yarn(
            2 * freqs.shape[-1], factor=scale, original_max_position_embeddings=self.context, theta=self.theta
        )
        cos, sin = ndrope.cos_sin(ndrope.angles(positions, recipe.freqs.to(device)))
        return cos * recipe.attention_scale, sin * recipe.attention_scale

    def forward(self, idx: Tensor) -> Tensor:
        B, N = idx.shape
        x = self.embed(idx)  # B, N, C
        rope, mask = None, causal_mask(N, idx.device)
        if self.encoding == "learned":
            x = x + self.table[torch.arange(N, device=idx.device).clamp(max=self.context - 1)]
        elif self.encoding == "sinusoidal":
            x = x + sincos_embed((N,), x.shape[-1], device=idx.device).to(x.dtype)  # N, C: sin | cos
        elif self.encoding == "alibi":
            mask = mask + self.alibi((N,))  # H, N, N: -slope_h * (i - j) for j <= i
        elif self.encoding in ("rope", "p-rope"):
            rope = self.rope(N, idx.device)
        for block in self.blocks:
            x = block(x, rope=rope, attn_mask=mask)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


@torch.no_grad()
def bits_per_byte(model: ByteLM, data: Tensor, length: int, batch: int) -> float:
    """Mean next-byte loss in bits over ``data`` cut into consecutive windows of ``length`` + 1 bytes."""
    windows = (data.numel() - 1) // length
    if windows < 1:
        raise ValueError(f"evaluation text has {data.numel()} bytes, fewer than length + 1 = {length + 1}")
    chunks = data[: windows * length + 1]
    starts = torch.arange(windows) * length
    total, count = 0.0, 0
    for i in range(0, windows, batch):
        window = chunks[starts[i : i + batch, None] + torch.arange(length + 1)].long()
        logits = model(window[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="sum").item()
        count += window[:, 1:].numel()
    return total / count / math.log(2)


# ----------------------------------------------------------------------------- the study


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = example_parser("text_lm", __doc__)
    parser.add_argument("--corpus-dir", default=None, help="folder of *.py files (None: this Python's stdlib)")
    parser.add_argument("--eval-every", type=int, default=10, help="hold out every k-th file for evaluation")
    parser.add_argument("--eval-bytes", type=int, default=32768, help="held-out bytes evaluated at every length")
    parser.add_argument("--context", type=int, default=128, help="training context (tokens = bytes)")
    parser.add_argument("--theta", type=float, default=10000.0, help="RoPE base")
    parser.add_argument("--p", type=float, default=0.75, help="p-RoPE: fraction of frequencies that rotate")
    add_model_arguments(parser, dim=128, depth=2, heads=4, steps=400, batch=16,
                        item="windows", compared="encoding")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS,
                        help="position encodings to train")
    add_run_arguments(parser, "text_lm")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train every encoding, evaluate at 1x-8x the context, write the report; returns its JSON record."""
    start = time.perf_counter()
    args = parse_args(argv)
    setup_torch(args.threads)
    corpus_dir = Path(args.corpus_dir) if args.corpus_dir else stdlib_dir()
    train_data, eval_data, train_files, eval_files = load_corpus(corpus_dir, args.eval_every)
    lengths = [args.context * f for f in LENGTH_FACTORS]
    eval_bytes = min(args.eval_bytes, eval_data.numel() - 1)
    if eval_bytes < lengths[-1]:
        raise ValueError(
            f"held-out text has {eval_data.numel()} bytes; evaluating at 8 x context = {lengths[-1]} needs more "
            "(lower --context or --eval-every)"
        )
    eval_data = eval_data[: eval_bytes - eval_bytes % lengths[-1] + 1]  # the same bytes at every length
    print(
        f"corpus {corpus_dir}: train {len(train_files)} files {train_data.numel()} B, "
        f"eval {len(eval_files)} files, {eval_data.numel() - 1} B evaluated",
        flush=True,
    )
    results: dict[str, list[list[float]]] = {}  # row name -> per seed, bpb per length
    train_loss: dict[str, list[float]] = {}
    for encoding in args.encodings:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = ByteLM(
                encoding,
                context=args.context,
                dim=args.dim,
                depth=args.depth,
                num_heads=args.heads,
                theta=args.theta,
                p=args.p,
            )
            batches = random_windows(train_data, args.context, args.batch, seed)
            t0 = time.perf_counter()
            losses = train(
                model, batches, lm_loss, steps=args.steps, lr=args.lr, log_every=max(1, args.steps // 4), name=encoding
            )
            train_loss.setdefault(encoding, []).append(sum(losses[-20:]) / len(losses[-20:]) / math.log(2))
            scalings = SCALINGS if encoding == "rope" else ("none",)
            for scaling in scalings:
                model.set_scaling(scaling)
                name = encoding if scaling == "none" else f"{encoding}+{scaling}"
                row = [bits_per_byte(model, eval_data, n, batch=max(1, 8192 // n)) for n in lengths]
                results.setdefault(name, []).append(row)
            print(f"  [{encoding}] seed {seed}: {time.perf_counter() - t0:.0f}s, bpb {results[encoding][-1]}", flush=True)

    columns = ["encoding", *[f"{f}x ({n})" for f, n in zip(LENGTH_FACTORS, lengths)], "8x / 1x"]
    rows = []
    for name, per_seed in results.items():
        mean = [sum(r[i] for r in per_seed) / len(per_seed) for i in range(len(lengths))]
        row = {"encoding": name, **{c: v for c, v in zip(columns[1:-1], mean)}, "8x / 1x": mean[-1] / mean[0]}
        row["per_seed"] = per_seed
        row["train_bpb_last20"] = train_loss[name.split("+")[0]]
        rows.append(row)

    def plot(figure) -> None:
        ax = figure.add_subplot(1, 1, 1)
        for row in rows:
            ax.plot(lengths, [row[c] for c in columns[1:-1]], marker="o", label=row["encoding"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.axvline(args.context, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"evaluation context (bytes); trained at {args.context}")
        ax.set_ylabel("held-out bits per byte (lower is better)")
        values = [row[c] for row in rows for c in columns[1:-1]]
        ax.set_ylim(min(values) * 0.97, max(values) * 1.03)
        ax.set_title("Byte LM on the Python stdlib: train short, test long")
        ax.legend(fontsize=8, ncol=2)

    config = {k: v for k, v in vars(args).items() if k not in ("out",)}
    config.update(corpus_dir=str(corpus_dir), train_bytes=train_data.numel(), eval_bytes_used=eval_data.numel() - 1,
                  eval_files=eval_files)  # fmt: skip
    notes = (
        f"Bits per byte on {eval_data.numel() - 1} held-out bytes ({len(eval_files)} stdlib files never trained on), "
        f"cut into windows of each length; every token of a window counts. Trained {args.steps} steps x "
        f"{args.batch} x {args.context} bytes per encoding, seeds {args.seeds} (mean shown). "
        "`+pi`: positions divided by length/context at eval; `+ntk`: `ndrope.ntk_scaled_frequencies` at "
        "scale length/context; `+yarn`: `ndrope.recipes.yarn` (factor length/context, with its attention scale). "
        "`learned` reuses its last row beyond the trained context."
    )
    wall = time.perf_counter() - start
    command = command_line("examples.text_lm", argv)
    write_report(args.out, title="Text: train short, test long (byte LM, Python stdlib)", command=command,
                 columns=columns, rows=rows, config=config, wall_time_s=wall, notes=notes, plot=plot)  # fmt: skip
    print(f"wrote {args.out}/report.md ({wall:.0f}s)")
    return {"rows": rows, "wall_time_s": wall, "columns": columns}


if __name__ == "__main__":
    main()
