"""OmegaConf resolvers the config files use (registered with the schemas: qexp.config.schema).

``${qexp.edge_bits:${w_bits},${a_bits}}``: the default bits of the first and last layers.
A full-precision run (both widths 32) keeps its edges in full precision too, so ``bits=32``
is a plain float network; a quantized run keeps them at 8 bits, the usual protection of the
input and output layers. Setting ``layers.first_bits`` / ``last_bits`` replaces this.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from qexp.record import RESUME_FREE_KEYS

#: edge bits of a quantized run when not set explicitly
QUANTIZED_EDGE_BITS = 8


def edge_bits(w_bits: int, a_bits: int) -> int:
    """32 when the run is full precision (both widths >= 32), else :data:`QUANTIZED_EDGE_BITS`."""
    try:
        full = float(w_bits) >= 32 and float(a_bits) >= 32
    except (TypeError, ValueError):  # not a number: qexp.config.validate names the bad key
        full = False
    return 32 if full else QUANTIZED_EDGE_BITS


def resume_free_keys(*extra: str) -> list[str]:
    """The config keys that change no result (qexp.record.RESUME_FREE_KEYS) plus ``extra``:
    Hydra leaves them out of a sweep job's dir name, so a resumed job finds its dir again."""
    return [*RESUME_FREE_KEYS, *extra]


def register_resolvers() -> None:
    """Register qexp's resolvers with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("qexp.edge_bits"):
        OmegaConf.register_new_resolver("qexp.edge_bits", edge_bits)
    if not OmegaConf.has_resolver("qexp.resume_free_keys"):
        OmegaConf.register_new_resolver("qexp.resume_free_keys", resume_free_keys)
