"""`ndrope` inside other libraries' models, in place and per instance.

    from ndrope.integrations import transformers, timm
    transformers.patch(model)        # a transformers Llama / Qwen-VL / Gemma3 / Pixtral / DINOv3 model
    timm.patch(model)                # a timm Eva / EVA-02 / naver RoPE-ViT / DINOv3 model

Each submodule touches its library only through the model it is given: ``import ndrope`` imports
neither library, and importing a submodule imports nothing but torch and ndrope.
"""
