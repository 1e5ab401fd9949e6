"""Packaging for llada_jax. Core install is lean; heavy parts are extras."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "ml_dtypes>=0.5",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "sentencepiece>=0.2",
    "grain>=0.2.10",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
]

EXTRAS = {
    "tfds": ["tensorflow-datasets>=4.9.7", "importlib_resources"],
    "torch": ["torch==2.13.0"],
    "hf": ["torch==2.13.0", "transformers>=4.46"],
    "eval": ["lm-eval==0.4.13"],
    "app": ["gradio>=5"],
    "tpu": ["jax[tpu]==0.10.2"],
    "test": ["pytest>=8", "pytest-timeout"],
}

setup(
    name="llada_jax",
    version="0.1.0",
    description="LLaDA, the masked-diffusion language model, in JAX/Flax for TPU pods",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llada_jax", "llada_jax.*", "convert", "convert.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "llada-sample=llada_jax.sample:main",
        "llada-chat=llada_jax.chat:main",
        "llada-tokenizer=llada_jax.tokenizer:main",
        "llada-hf-to-orbax=convert.hf_to_orbax:main",
        "llada-orbax-to-hf=convert.orbax_to_hf:main",
    ]},
)
