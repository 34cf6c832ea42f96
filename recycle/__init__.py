"""LoRA Recycle: tuning-free few-shot learning by recycling pre-tuned LoRAs (Hu et al., CVPR 2025)."""
__version__ = "0.1.0"
