"""One module per model family; each builds its Transformer from `llada_jax.layers`."""
