"""Benchmarks for ndrope: `python -m bench` (see `python -m bench --help`).

`bench.rotary` times `ndrope.apply_rotary` against the copy bound and the common formulations in
`bench.peers`; `bench.vit_step` times a ViT training step per position encoding. Timings come from
`bench.timing`, which interleaves the candidates so that machine noise hits them alike.
"""
