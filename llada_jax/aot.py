"""`python -m llada_jax.aot`: alias of `llada_jax.training.aot`."""

from absl import app

from llada_jax.training import aot as _impl

main = _impl.main


def __getattr__(name: str):
  """Old import path: `from llada_jax import aot` still reaches the module's names."""
  return getattr(_impl, name)


if __name__ == "__main__":
  _impl._define_flags()  # pylint: disable=protected-access
  app.run(main)
