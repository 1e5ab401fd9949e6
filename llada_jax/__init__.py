"""llada_jax: LLaDA, the masked-diffusion language model, in JAX/Flax."""

from llada_jax.checkpoint import load
from llada_jax.config import ModelConfig
from llada_jax.likelihood import log_likelihood
from llada_jax.model import Transformer
from llada_jax.sampling import generate

__all__ = ["load", "ModelConfig", "Transformer", "generate", "log_likelihood"]
__version__ = "0.1.0"
