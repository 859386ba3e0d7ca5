"""Helpers for learning Llama 3.2 Vision inference: load a model, ask about an image, chat, measure."""

from .generation import Chat, ChatError, describe_image
from .images import ImageLoadError, load_image
from .model import ModelLoadError, VisionModel, load_model

__all__ = [
    "Chat",
    "ChatError",
    "ImageLoadError",
    "ModelLoadError",
    "VisionModel",
    "describe_image",
    "load_image",
    "load_model",
]
__version__ = "0.1.0"
