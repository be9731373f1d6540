"""Three small, complete models that use `ndrope` beyond 2D images, each on real data installed offline.

* `examples.text_lm`: a byte-level causal language model on the Python standard library's source,
  trained at one context length and evaluated at 1x-8x (NoPE, learned, sinusoidal, ALiBi, RoPE,
  RoPE with eval-time context scaling, p-RoPE).
* `examples.video`: a 3D `vit` on clips of moving Fashion-MNIST garments (label = direction before
  and after a half-way turn), evaluated at more frames and larger frames than trained.
* `examples.multimodal`: one packed sequence of image patches and a question ("what is top left ?"),
  with `ndrope.multimodal_positions` and a 3-axis M-RoPE against flat 1D positions and none.

Run each from the repository root, e.g. ``python -m examples.text_lm``; each writes
``reports/<example>/`` (a Markdown and a JSON table and a PNG plot). The models are built from the
library (`vit.RopeBlock` / `vit.RopeAttention`, `vit.create_vit`, `ndrope`); `examples.common` holds
what the three share besides it: command-line options, the training loop (`training.schedule`), the
Fashion-MNIST reader (`training.idx`) and the report writer (`training.files`).
"""
