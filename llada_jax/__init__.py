"""llada_jax: LLaDA, the masked-diffusion language model, in JAX/Flax."""

from llada_jax.checkpoints.loading import load
from llada_jax.config import ModelConfig
from llada_jax.models.llada import Transformer
from llada_jax.sampling.likelihood import log_likelihood
from llada_jax.sampling.sampler import generate

__all__ = ["load", "ModelConfig", "Transformer", "generate", "log_likelihood"]
__version__ = "0.1.0"
