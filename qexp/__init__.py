"""qexp: quantization-aware-training experiments on one trainer."""

from qexp.resolvers import register_resolvers

register_resolvers()  # the config files' ${qexp.*:...} interpolations, in every qexp process
