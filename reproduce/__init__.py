"""The offline miniature reproduction of LoRA Recycle (glyph data, a small ViT, the whole recycling pipeline)."""
