"""`python -m llada_jax.train`: alias of `llada_jax.training.train`."""

from absl import app

from llada_jax.training import train as _impl

main = _impl.main


def __getattr__(name: str):
  """Old import path: `from llada_jax import train` still reaches the module's names."""
  return getattr(_impl, name)


if __name__ == "__main__":
  _impl.define_flags()
  app.run(main, flags_parser=_impl.validate.parse_flags)
