"""Checkpoint conversion: HuggingFace LLaDA snapshots <-> Orbax parameter checkpoints.

`python -m llada_jax.convert.hf_to_orbax --hf_dir DIR --output_dir DIR` and
`python -m llada_jax.convert.orbax_to_hf --checkpoint DIR --output_dir DIR`; both stream
one (stacked) parameter at a time and write to a temporary directory beside
the output that is renamed into place only when everything is on disk (for a
gs:// output: a local one, uploaded with config.json last; see `staging.py`).
"""
