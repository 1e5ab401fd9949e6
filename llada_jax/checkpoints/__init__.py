"""Model directories: the HF tensor table and safetensors I/O (hf), Orbax params (orbax)."""
