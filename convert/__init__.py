"""Alias of `llada_jax.convert` for `python -m convert.*` from a clone (not installed)."""
