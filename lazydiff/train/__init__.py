"""Training for the shipped ShapesWorld models (``python -m lazydiff.train CONFIG``), on HF accelerate."""
from .config import MODELS, TrainConfig
from .loop import train

__all__ = ["TrainConfig", "MODELS", "train"]
