"""DTensor sharding rules of the ndrope ops, on 2 CPU processes (gloo).

The DTensor checks run in one spawned pair of processes (about 10 s): every case compares the sharded
result, gathered, with the unsharded rotation, checks the output keeps x's placement, and counts the
collectives the rotation issued (none).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

import ndrope

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, check_name: str, errors) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        globals()[check_name]()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_on_two_processes(check_name: str) -> None:
    """Run the module-level function ``check_name`` on 2 gloo processes; fail with the ranks' tracebacks."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(rank, port, check_name, errors)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(f"rank {rank}:\n{text}" for rank, text in failures)
    assert [process.exitcode for process in processes] == [0] * WORLD


# ---------------------------------------------------------------------------------------------------------
# DTensor: run inside the spawned processes


def dtensor_checks() -> None:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)  # the same tensors on both ranks
    B, H, N, D, P = 4, 2, 6, 8, 3  # partial rotation: 2P = 6 of D = 8 channels
    x = torch.randn(B, H, N, D)
    shared = torch.randn(N, P)  # angles shared by heads
    per_head = torch.randn(H, N, P)
    per_sample = torch.randn(B, 1, N, P)

    def rotated(t: torch.Tensor, theta: torch.Tensor, layout: str) -> torch.Tensor:
        return ndrope.apply_rotary(t, (theta.cos(), theta.sin()), layout=layout)

    cases = [
        # (x placement, angles, angles placement)
        (Shard(0), shared, Replicate()),  # batch
        (Shard(1), shared, Replicate()),  # heads
        (Shard(2), shared, Replicate()),  # tokens, tables replicated: sliced locally
        (Shard(2), shared, Shard(0)),  # tokens, tables sharded to match
        (Shard(1), per_head, Shard(0)),  # per-head tables sharded with the heads
        (Shard(0), per_sample, Shard(0)),
        (Replicate(), shared, Replicate()),
    ]
    for layout in ("half", "interleaved"):
        for placement, theta, table_placement in cases:
            expected = rotated(x, theta, layout)
            x_d = distribute_tensor(x, mesh, [placement])
            cos_d = distribute_tensor(theta.cos(), mesh, [table_placement])
            sin_d = distribute_tensor(theta.sin(), mesh, [table_placement])
            with CommDebugMode() as comms:
                out = ndrope.apply_rotary(x_d, (cos_d, sin_d), layout=layout)
            where = f"x {placement}, tables {tuple(theta.shape)} {table_placement}, {layout}"
            assert isinstance(out, DTensor), where
            assert out.placements == (placement,), where
            assert comms.get_total_counts() == 0, f"{where}: {comms.get_comm_counts()}"
            assert_close(out.full_tensor(), expected, atol=1e-6, rtol=1e-6, msg=where)

    # partial x (a sum over ranks) rotates to a partial output: the rotation is linear
    part = torch.randn(B, H, N, D) * (dist.get_rank() + 1)
    x_partial = DTensor.from_local(part, mesh, [Partial()])
    replicated = [distribute_tensor(t, mesh, [Replicate()]) for t in (shared.cos(), shared.sin())]
    out = ndrope.apply_rotary(x_partial, tuple(replicated))
    assert out.placements == (Partial(),)
    assert_close(out.full_tensor(), rotated(x_partial.full_tensor(), shared, "half"), atol=1e-5, rtol=1e-5)

    # backward: grad_x keeps x's placement, the table gradients are the unsharded ones
    for placement, theta, table_placement in cases[:5]:
        x_ref, cos_ref, sin_ref = (t.clone().requires_grad_() for t in (x, theta.cos(), theta.sin()))
        weight = torch.randn(B, H, N, D)
        (ndrope.apply_rotary(x_ref, (cos_ref, sin_ref)) * weight).sum().backward()
        x_d = distribute_tensor(x, mesh, [placement]).requires_grad_()
        cos_d = distribute_tensor(theta.cos(), mesh, [table_placement]).requires_grad_()
        sin_d = distribute_tensor(theta.sin(), mesh, [table_placement]).requires_grad_()
        weight_d = distribute_tensor(weight, mesh, [placement])
        (ndrope.apply_rotary(x_d, (cos_d, sin_d)) * weight_d).sum().backward()
        where = f"backward: x {placement}, tables {tuple(theta.shape)} {table_placement}"
        assert x_d.grad.placements == (placement,), where
        assert_close(x_d.grad.full_tensor(), x_ref.grad, atol=1e-5, rtol=1e-5, msg=where)
        assert_close(cos_d.grad.full_tensor(), cos_ref.grad, atol=1e-5, rtol=1e-5, msg=where)
        assert_close(sin_d.grad.full_tensor(), sin_ref.grad, atol=1e-5, rtol=1e-5, msg=where)

    # learned frequencies through RotaryEmbedding, q and k sharded on heads
    rope = ndrope.RotaryEmbedding.mixed(D, 2, H, generator=torch.Generator().manual_seed(0))
    q = torch.randn(B, H, 9, D)
    q_d = distribute_tensor(q, mesh, [Shard(1)])
    freqs_d = distribute_tensor(rope.freqs.detach(), mesh, [Shard(0)]).requires_grad_()
    cos_d, sin_d = ndrope.cos_sin(ndrope.angles(distribute_tensor(ndrope.grid((3, 3)), mesh, [Replicate()]), freqs_d))
    out = ndrope.apply_rotary(q_d, (cos_d, sin_d))
    assert out.placements == (Shard(1),)
    reference_q, _ = rope(q, q, (3, 3))
    assert_close(out.full_tensor(), reference_q, atol=1e-5, rtol=1e-5)

    # q and k together (ndrope::rotate_pair, as RotaryEmbedding.forward does), sharded on heads or tokens
    k = torch.randn(B, H, 9, D)
    fixed = ndrope.RotaryEmbedding(D, 2, theta=100.0)
    expected_q, expected_k = fixed(q, k, (3, 3))
    for placement in (Shard(1), Shard(2)):
        q_d, k_d = (distribute_tensor(t, mesh, [placement]).requires_grad_() for t in (q, k))
        cos, sin = fixed.rotation((3, 3))
        table = [Shard(0)] if placement == Shard(2) else [Replicate()]
        tables = tuple(distribute_tensor(t, mesh, table) for t in (cos, sin))
        with CommDebugMode() as comms:
            out_q, out_k = ndrope.apply_rotary_pair(q_d, k_d, tables)
        assert comms.get_total_counts() == 0 and out_q.placements == out_k.placements == (placement,)
        assert_close(out_q.full_tensor(), expected_q, atol=1e-6, rtol=1e-6)
        assert_close(out_k.full_tensor(), expected_k, atol=1e-6, rtol=1e-6)
        (out_q * out_k).sum().backward()
        assert q_d.grad.placements == (placement,)

    # x sharded on the channel pairs: a clear error naming the placement, not an all-gather
    x_bad = distribute_tensor(x, mesh, [Shard(3)])
    cos_r, sin_r = (distribute_tensor(t, mesh, [Replicate()]) for t in (shared.cos(), shared.sin()))
    try:
        with CommDebugMode() as comms:
            ndrope.apply_rotary(x_bad, (cos_r, sin_r))
    except Exception as error:  # DTensor may wrap the rule's ValueError
        text = f"{error} {error.__cause__}"
        assert "sharded on its last dim" in text and "Shard(dim=3)" in text, text
        assert comms.get_total_counts() == 0
    else:
        raise AssertionError("x sharded on its last dim was served")


def test_dtensor_rotation_keeps_the_placement_without_communication():
    run_on_two_processes("dtensor_checks")


@pytest.mark.slow
def test_readme_dtensor_example_runs_under_torchrun(tmp_path):
    """The README's DTensor block, as written, on 2 processes launched by torchrun (gloo)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "distribute_tensor" in b)
    script = tmp_path / "dtensor_rope.py"
    script.write_text(block)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(script)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
