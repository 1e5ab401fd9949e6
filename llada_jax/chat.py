"""`python -m llada_jax.chat`: alias of `llada_jax.frontends.chat`."""

import sys

from llada_jax.frontends import chat as _impl

main = _impl.main


def __getattr__(name: str):
  """Old import path: `from llada_jax import chat` still reaches the module's names."""
  return getattr(_impl, name)


if __name__ == "__main__":
  sys.exit(main())
