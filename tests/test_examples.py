"""The three examples (`examples/`) run end to end on a tiny budget, and their data and models do what
their docstrings say. Fashion-MNIST is replaced by tiny gzip IDX files in the real format."""

from __future__ import annotations

import gzip
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ndrope
from examples import common, multimodal, text_lm, video
from ndrope import recipes
from training.schedule import warmup_cosine

parametrize = pytest.mark.parametrize


def write_idx(path: Path, array: torch.Tensor) -> None:
    """An IDX file (uint8 payload) as Fashion-MNIST ships it: magic 0x00000800 | ndim, big-endian sizes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", 40), ("t10k", 20)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator)
        images[:, :4] = 0  # a blank margin, as real garments have
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", torch.arange(count) % 10)
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        body = "".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}  # comment {j}\n" for j in range(40))
        (root / f"module_{i}.py").write_text(f'"""Module {i}."""\n' + body)
    (root / "notes.txt").write_text("not python: ignored")
    return root


def read_report(out: Path) -> dict:
    assert (out / "report.md").read_text().startswith("# ")
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    return json.loads((out / "report.json").read_text())


# ----------------------------------------------------------------------------- common


def test_write_report_is_atomic_when_the_plot_fails(tmp_path):
    kwargs = dict(title="t", command="c", columns=["a"], rows=[{"a": 1.0}], config={}, wall_time_s=1.0, notes="n")
    common.write_report(tmp_path, plot=lambda figure: figure.add_subplot(1, 1, 1).plot([0, 1]), **kwargs)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(figure):
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        common.write_report(tmp_path, plot=broken, **{**kwargs, "title": "new"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_report_table_formats_floats_and_missing():
    table = common.report_table(["x", "y"], [{"x": "a", "y": 1.23456, "z": 0}, {"x": "b", "y": float("nan")}])
    assert table.splitlines() == ["| x | y |", "|---|---:|", "| a | 1.235 |", "| b | n/a |"]


def test_load_fashion_mnist_names_the_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root=.*apt-get install -y dataset-fashion-mnist"):
        common.load_fashion_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        common.load_fashion_mnist(tmp_path, "val")


def test_read_idx_round_trips_and_rejects_truncated_files(tmp_path):
    array = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    write_idx(tmp_path / "a.gz", array)
    assert torch.equal(common.read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "b").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes())[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        common.read_idx(tmp_path / "b")


def test_train_follows_the_warmup_cosine_schedule():
    """Step s of `common.train` runs at lr * warmup_cosine(s, steps // 20, steps, MIN_LR_RATIO)."""
    rates = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"])
    )
    batches = iter(lambda: torch.ones(4, 2), None)
    try:
        losses = common.train(torch.nn.Linear(2, 1), batches, lambda m, x: m(x).square().mean(), steps=40, lr=0.5)
    finally:
        hook.remove()
    assert rates == [0.5 * warmup_cosine(s, 2, 40, common.MIN_LR_RATIO) for s in range(40)] and len(losses) == 40
    assert rates[:2] == [0.25, 0.5] and 0.05 < rates[-1] < 0.051  # warm-up over 2 steps, the last step near the floor
    with pytest.raises(ValueError, match="steps=0"):
        common.train(torch.nn.Linear(2, 1), batches, lambda m, x: m(x).sum(), steps=0, lr=0.5)


@parametrize("rope", [False, True])
def test_rope_blocks_attend_by_relative_position(rope):
    """With RoPE the causal blocks are invariant to a common shift of all positions; without, positions do nothing."""
    torch.manual_seed(0)
    block = common.rope_blocks(16, 1, 2)[0].eval()
    torch.nn.init.normal_(block.attn.qkv.weight)  # sharp attention, so positions matter
    x, mask = torch.randn(1, 5, 16), text_lm.causal_mask(5, torch.device("cpu"))
    freqs, positions = ndrope.axial_frequencies(8, 1, theta=100.0), ndrope.grid((5,))

    def encode(positions):
        return block(x, rope=ndrope.cos_sin(ndrope.angles(positions, freqs)) if rope else None, attn_mask=mask)

    torch.testing.assert_close(encode(positions), encode(positions + 7), atol=1e-5, rtol=1e-5)
    if rope:
        assert not torch.allclose(encode(positions), encode(positions * 3), atol=1e-3)


def test_rope_blocks_name_a_width_their_heads_do_not_divide():
    with pytest.raises(ValueError, match="dim=30 must be divisible by num_heads=4"):
        common.rope_blocks(30, 1, 4)


# ----------------------------------------------------------------------------- text


def test_corpus_split_is_by_file_and_disjoint(corpus_dir):
    train, held_out, train_files, eval_files = text_lm.load_corpus(corpus_dir, eval_every=2)
    assert eval_files == ["module_0.py", "module_2.py"] and train_files == ["module_1.py", "module_3.py"]
    assert bytes(held_out.tolist()) == b"\n".join((corpus_dir / f).read_bytes() for f in eval_files)
    assert b"function_0_" not in bytes(train.tolist())
    with pytest.raises(FileNotFoundError, match="corpus_dir"):
        text_lm.load_corpus(corpus_dir / "missing", eval_every=2)


@parametrize("encoding", text_lm.ENCODINGS)
def test_byte_lm_is_causal_at_longer_contexts(encoding):
    torch.manual_seed(0)
    model = text_lm.ByteLM(encoding, context=8, dim=16, depth=2, num_heads=2).eval()
    idx = torch.randint(0, 256, (2, 24))  # 3x the context
    changed = idx.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 256
    out, out_changed = model(idx), model(changed)
    assert out.shape == (2, 24, 256)
    torch.testing.assert_close(out[:, :15], out_changed[:, :15])
    assert not torch.allclose(out[:, 15:], out_changed[:, 15:])


def test_rope_scalings_change_only_longer_contexts():
    model = text_lm.ByteLM("rope", context=8, dim=16, depth=1, num_heads=2, theta=100.0)
    plain = model.rope(16, torch.device("cpu"))
    for scaling in [s for s in text_lm.SCALINGS if s != "none"]:
        model.set_scaling(scaling)
        torch.testing.assert_close(model.rope(8, torch.device("cpu")), ndrope.cos_sin(ndrope.angles(ndrope.grid((8,)), model.freqs)))
        cos, _ = model.rope(16, torch.device("cpu"))
        assert not torch.allclose(cos, plain[0])
    model.set_scaling("pi")  # position interpolation = half-step positions at 2x
    torch.testing.assert_close(model.rope(16, torch.device("cpu")), ndrope.cos_sin(ndrope.angles(ndrope.grid((16,)) / 2, model.freqs)))
    with pytest.raises(ValueError, match="scaling"):
        model.set_scaling("linear")
    with pytest.raises(ValueError, match="plain RoPE"):
        text_lm.ByteLM("alibi", context=8, dim=16, depth=1, num_heads=2).set_scaling("ntk")


def test_p_rope_keeps_the_fastest_frequencies():
    rope = text_lm.ByteLM("rope", context=8, dim=32, depth=1, num_heads=2).freqs
    p_rope = text_lm.ByteLM("p-rope", context=8, dim=32, depth=1, num_heads=2, p=0.75).freqs
    assert p_rope.shape == rope.shape == (1, 8)
    torch.testing.assert_close(p_rope[:, :6], rope[:, :6])
    assert (p_rope[:, 6:] == 0).all()
    torch.testing.assert_close(p_rope, recipes.p_rope(16, 0.75).freqs)  # the named recipe, same frequencies
    with pytest.raises(ValueError, match="encoding"):
        text_lm.ByteLM("xpos", context=8, dim=16, depth=1, num_heads=2)


def test_bits_per_byte_of_a_uniform_model_is_eight():
    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, 256)

    data = torch.randint(0, 256, (100,), dtype=torch.uint8)
    assert text_lm.bits_per_byte(Uniform(), data, length=16, batch=3) == pytest.approx(8.0)


def test_text_lm_runs_end_to_end(corpus_dir, tmp_path):
    out = tmp_path / "text"
    argv = ["--corpus-dir", str(corpus_dir), "--eval-every", "2", "--eval-bytes", "512", "--context", "16",
            "--dim", "16", "--depth", "1", "--heads", "2", "--steps", "3", "--batch", "4", "--out", str(out)]  # fmt: skip
    text_lm.main(argv)
    report = read_report(out)
    names = [row["encoding"] for row in report["rows"]]
    assert names == ["nope", "learned", "sinusoidal", "alibi", "rope", "rope+pi", "rope+ntk", "rope+yarn", "p-rope"]
    assert report["columns"][1:5] == ["1x (16)", "2x (32)", "4x (64)", "8x (128)"]
    for row in report["rows"]:
        values = [row[c] for c in report["columns"][1:5]]
        assert all(0 < v < 12 and math.isfinite(v) for v in values), row
    rope = {row["encoding"]: row for row in report["rows"]}
    assert rope["rope+pi"]["1x (16)"] == rope["rope"]["1x (16)"]  # scaling only acts beyond the context
    assert "examples.text_lm" in report["command"] and report["wall_time_s"] > 0


# ----------------------------------------------------------------------------- video


def test_clips_turn_half_way_as_labelled():
    garments = torch.rand(5, 4, 4)
    clips, labels = video.make_clips(garments, frames=6, size=10, count=32, generator=torch.Generator().manual_seed(1))
    assert clips.shape == (32, 1, 6, 10, 10) and labels.shape == (32,) and labels.max() < video.NUM_CLASSES
    assert len(set(labels.tolist())) > 8
    for clip, label in zip(clips[:, 0], labels):
        first, second = divmod(int(label), len(video.DIRECTIONS))
        moves = [video.DIRECTIONS[first]] * 3 + [video.DIRECTIONS[second]] * 2  # frame t -> t + 1
        speeds = {
            v for v in video.SPEEDS
            if all(torch.equal(clip[t + 1], clip[t].roll((v * dy, v * dx), dims=(0, 1))) for t, (dy, dx) in enumerate(moves))
        }  # fmt: skip
        assert len(speeds) == 1, (label, speeds)
    with pytest.raises(ValueError, match="garment"):
        video.make_clips(garments, frames=2, size=3, count=1, generator=torch.Generator())


def test_video_runs_end_to_end(fashion_root, tmp_path):
    out = tmp_path / "video"
    argv = ["--data-root", str(fashion_root), "--frames", "2", "--size", "12", "--garment", "6", "--patch", "6",
            "--eval-frames", "4", "--eval-sizes", "18", "--eval-clips", "8", "--dim", "24", "--depth", "1",
            "--heads", "2", "--steps", "2", "--batch", "4", "--out", str(out)]  # fmt: skip
    video.main(argv)
    report = read_report(out)
    assert [(r["pos_embed"], r["mode"]) for r in report["rows"]] == [
        ("learned", "-"),
        *[(kind, mode) for kind in ("rope_axial", "rope_mixed") for mode in ("interpolate", "extrapolate", "ntk")],
        ("none", "-"),
    ]
    assert report["columns"][2:] == ["train size (T=2, S=12)", "T=4", "S=18", "T=4, S=18", "train size, min..max over seeds"]
    for row in report["rows"]:
        assert all(0 <= row[c] <= 100 for c in report["columns"][2:-1])
        assert len(row["per_seed"]) == 1
    with pytest.raises(ValueError, match="multiples of --patch"):
        video.main([*argv[:-2], "--eval-sizes", "15", "--out", str(out)])
    # two seeds: each row is the mean of its per-seed accuracies, and the range names both
    video.main([*argv, "--seeds", "0", "1", "--pos-embeds", "rope_axial"])
    report = read_report(out)
    for row in report["rows"]:
        runs = row["per_seed"]
        assert len(runs) == 2
        for j, column in enumerate(report["columns"][2:-1]):
            assert row[column] == pytest.approx((runs[0][j] + runs[1][j]) / 2)
        low, high = sorted(run[0] for run in runs)
        assert row["train size, min..max over seeds"] == f"{low:.1f}..{high:.1f}"


# ----------------------------------------------------------------------------- multimodal


def test_questions_are_answered_by_the_named_quadrant():
    images = torch.arange(0, 250, 25)[:, None, None].expand(10, 28, 28).to(torch.uint8)  # image i: grey 25 * i
    labels = torch.arange(10)
    mosaics, tokens, answers, classes = multimodal.make_questions(images, labels, 64, torch.Generator().manual_seed(0))
    assert mosaics.shape == (64, 28, 28) and tokens.shape == (64, multimodal.TEXT_LENGTH) and classes.shape == (64, 4)
    corners = [(0, 0), (0, 14), (14, 0), (14, 14)]
    asked = []
    for mosaic, words, answer, shown in zip(mosaics, tokens, answers, classes):
        words = [multimodal.VOCAB[i] for i in words]
        assert words[-1] == "?"
        row, col = (0 if "top" in words else 14), (0 if "left" in words else 14)
        asked.append((row, col))
        assert round(mosaic[row, col].item() * 255 / 25) == answer  # the class of the garment in that quadrant
        assert [round(mosaic[r, c].item() * 255 / 25) for r, c in corners] == shown.tolist()
    assert set(asked) == set(corners)


def test_mrope_positions_follow_the_qwen_rule_and_flat_positions_count():
    make = lambda kind: multimodal.PackedClassifier(kind, dim=24, depth=1, num_heads=2, theta=100.0)  # noqa: E731
    mrope, flat = make("mrope").token_positions(5), make("flat").token_positions(5)
    assert mrope.shape == (21, 3) and flat.shape == (21, 1)
    assert mrope[5].tolist() == [0, 1, 1] and mrope[16:].tolist() == [[4 + i] * 3 for i in range(5)]
    assert flat[:, 0].tolist() == list(range(21))
    assert make("mrope").freqs.shape == (3, 6) and make("flat").freqs.shape == (1, 6)
    with pytest.raises(ValueError, match="positions"):
        make("rope2d")


def test_multimodal_runs_end_to_end(fashion_root, tmp_path):
    out = tmp_path / "mm"
    argv = ["--data-root", str(fashion_root), "--eval-questions", "16", "--dim", "24", "--depth", "1", "--heads", "2",
            "--steps", "2", "--batch", "4", "--seeds", "0", "1", "--out", str(out)]  # fmt: skip
    multimodal.main(argv)
    report = read_report(out)
    assert [r["positions"] for r in report["rows"]] == list(multimodal.POSITIONS)
    for row in report["rows"]:
        assert len(row["per_seed"]) == 2
        assert row["correct (%)"] + row["wrong quadrant (%)"] + row["other (%)"] == pytest.approx(100.0)


def test_examples_import_no_lightning():
    """The examples share `training.idx`, `training.schedule` and `training.files` with the Lightning code,
    and never import lightning (`training/__init__` loads it only on first use of a Lightning class)."""
    code = "import sys, examples.text_lm, examples.video, examples.multimodal; print('lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "False"


@parametrize("example", [text_lm, video, multimodal])
def test_help_shows_every_default(example, capsys):
    """`python -m examples.<name> --help` gives each option's default (it used to show none)."""
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    options = [option for option in text.split() if option.startswith("--") and option != "--help"]
    assert options and text.count("(default: ") == len(set(options)), text
    assert "--threads THREADS torch CPU threads (1: see README) (default: 1)" in text
