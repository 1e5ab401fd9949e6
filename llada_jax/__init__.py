"""llada_jax: LLaDA, the masked-diffusion language model, in JAX/Flax."""

from llada_jax.checkpoint import load
from llada_jax.config import ModelConfig
from llada_jax.model import Transformer

__all__ = ["load", "ModelConfig", "Transformer"]
__version__ = "0.1.0"
