"""Uniform quantizer with a data-driven range (max-abs or MSE-optimal clipping).

Weights use a symmetric grid with a range computed from the current weights (the MSE search
runs every ``search_every`` optimizer steps during training, see ``UniformQuantizer``);
activations use an unsigned grid after ReLU (or signed where inputs go negative) with a range
tracked as an exponential moving average of per-batch estimates, so evaluation is deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qexp.bitwidth import is_ternary
from qexp.quant.base import Grid, Quantizer, channel_view, ternary_refusal

#: clipping ratios (of max |x|) tried by the MSE search: geometric, denser at small ratios
#: because low bit widths want aggressive clipping.
_RATIO_SPAN = (-1.3, 0.0, 16)  # log10 of the smallest and largest ratio, number of ratios
MSE_RATIOS = torch.logspace(*_RATIO_SPAN).tolist()

#: elements of one batched search pass (candidates x values); bounds the search's memory
_SEARCH_CHUNK = 1 << 22


def grid_for_range(rng: Tensor, bits: int, signed: bool, signed_grid: str = "midrise") -> Grid:
    """The uniform grid of ``bits`` whose outermost levels sit at +-``rng`` (or 0..``rng``).

    Signed ``midrise`` grids use all ``2**bits`` levels symmetrically around zero (no zero
    level, the DoReFa weight grid; 1 bit gives +-rng). ``narrow`` grids contain zero and use
    ``2**bits - 1`` levels (1 bit is treated like midrise since {0} alone is no grid).
    """
    rng = torch.clamp(rng, min=1e-8)
    offset, divisor, num_levels = _grid_shape(bits, signed, signed_grid)
    return Grid(offset=offset, step=rng / divisor, num_levels=num_levels)


def _grid_shape(bits: int, signed: bool, signed_grid: str) -> tuple[float, float, int]:
    """(offset in steps, range / step, number of levels) of a grid: plain Python numbers, so
    the search never reads a tensor back from the device."""
    if not signed:
        n = 2**bits
        return 0.0, float(n - 1), n
    if signed_grid == "narrow" and bits > 1:
        half = 2 ** (bits - 1) - 1
        return -float(half), float(half), 2 * half + 1
    half = 2 ** (bits - 1) - 0.5
    return -half, half, 2**bits


def max_abs_rows(x2d: Tensor, signed: bool) -> Tensor:
    """Per-row max |x| (signed grids) or max(x, 0) (unsigned grids): the max-abs range."""
    return x2d.abs().amax(dim=1) if signed else x2d.clamp(min=0).amax(dim=1)


#: the candidate ratios per (device, dtype), made once: no host-to-device copy per search, and
#: a compiled search reads them instead of recomputing ``10 ** k`` for every value it visits
_RATIO_CACHE: dict[tuple[str, torch.dtype], Tensor] = {}


def _candidate_ratios(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``MSE_RATIOS`` as a tensor on ``device`` (torch.logspace there, made once)."""
    key = (str(device), dtype)
    ratios = _RATIO_CACHE.get(key)
    if ratios is None:
        ratios = torch.logspace(*_RATIO_SPAN, device=device, dtype=dtype)
        if not torch.compiler.is_compiling():
            _RATIO_CACHE[key] = ratios
    return ratios


@torch.no_grad()
def mse_clip_ratio(
    x2d: Tensor, bits: int, signed: bool, signed_grid: str = "midrise"
) -> tuple[Tensor, Tensor]:
    """Per-row clipping ratio (one of ``MSE_RATIOS``) minimising the squared quantization error
    of ``x2d`` (rows = channels), and the rows' max-abs; the MSE range is their product.

    Each row is divided by its max-abs, so every candidate ratio is one scalar grid for all
    rows, and all candidates are tried in one batched pass (a few ops per search instead of a
    few per candidate: the search is dispatch-bound on small layers). Ties go to the smaller
    ratio, as in a sequential search with a strict ``<``.
    """
    max_abs = max_abs_rows(x2d, signed)
    u = x2d / max_abs.clamp(min=1e-12)[:, None]
    offset, divisor, num_levels = _grid_shape(bits, signed, signed_grid)
    ratios = _candidate_ratios(u.device, u.dtype)
    steps = ratios / divisor
    per_pass = max(1, _SEARCH_CHUNK // max(u.numel(), 1))
    errors = []
    for lo in range(0, len(MSE_RATIOS), per_pass):
        step = steps[lo : lo + per_pass, None, None]
        q = torch.div(u, step)  # (candidates, rows, values)
        q.sub_(offset).round_().clamp_(0, num_levels - 1).add_(offset).mul_(step).sub_(u)
        errors.append(q.square_().sum(dim=2))
    best = torch.cat(errors).argmin(dim=0)  # argmin returns the first of equal minima
    return ratios[best], max_abs


def mse_optimal_range(
    x2d: Tensor, bits: int, signed: bool, signed_grid: str = "midrise"
) -> Tensor:
    """Per-row range minimising the squared quantization error of ``x2d`` (rows = channels)."""
    ratio, max_abs = mse_clip_ratio(x2d, bits, signed, signed_grid)
    return ratio * max_abs


class UniformQuantizer(Quantizer):
    """Uniform grid with a max-abs or MSE-optimal range.

    Args:
        bits: bit width.
        role: ``"weight"`` or ``"activation"``.
        signed: ``True``/``False``, or ``None`` for the default (weights signed; activations
            signed only if the first batch seen has negative values).
        per_channel: one range per output channel (dim 0); weights only.
        scale_method: ``"max_abs"`` or ``"mse"`` (MSE-optimal clipping, searched over ratios).
        signed_grid: ``"midrise"`` (2**bits levels, no zero) or ``"narrow"`` (zero included;
            at ``bits=1.58`` the ternary grid ``{-s, 0, s}``, 2**2 - 1 levels).
        momentum: EMA momentum of the activation range.
        calib_samples: at most this many activation values feed the MSE search per batch.
        search_every: weights with ``scale_method="mse"``: during training the search runs
            after every ``search_every``-th optimizer step (:func:`refresh_weight_ranges`), and
            in between the last searched clipping ratio of each channel scales the current
            max |w|. 1 searches after every step (the exact MSE range at every forward).
            Evaluation always searches the current weights, so the deployed grid is the MSE
            optimum whatever the value.
    """

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        per_channel: bool = True,
        scale_method: str = "mse",
        signed_grid: str = "midrise",
        momentum: float = 0.1,
        calib_samples: int = 4096,
        search_every: int = 50,
    ) -> None:
        if is_ternary(bits) and not (
            role == "weight" and signed is not False and signed_grid == "narrow"
        ):
            raise ValueError(
                "w_bits=1.58 (ternary) on the uniform quantizer needs its narrow grid "
                "{-s, 0, s}: add quantizer.weight.signed_grid=narrow (or use quantizer=ternary "
                "or quantizer=seq)"
                if role == "weight"
                else ternary_refusal(type(self).__name__, role)
            )
        super().__init__(bits, role)
        #: (parameter key, range) of the last weight range computed outside training forwards
        self._range_cache: tuple[tuple, Tensor] | None = None
        if int(search_every) < 1:
            raise ValueError(f"search_every must be at least 1, got {search_every}")
        if scale_method not in ("max_abs", "mse"):
            raise ValueError(f"scale_method must be 'max_abs' or 'mse', got {scale_method!r}")
        if signed_grid not in ("midrise", "narrow"):
            raise ValueError(f"signed_grid must be 'midrise' or 'narrow', got {signed_grid!r}")
        self.per_channel = per_channel and role == "weight"
        self.scale_method = scale_method
        self.signed_grid = signed_grid
        self.momentum = momentum
        self.calib_samples = calib_samples
        self.search_every = int(search_every)
        if role == "weight":
            self.signed = True if signed is None else bool(signed)
            # Clipping ratio per channel from the last search (empty until the first): a
            # buffer, so a resumed run uses the ratio the uninterrupted one would have used.
            self.register_buffer("clip_ratio", torch.empty(0))
            self._has_ratio = False
        else:
            # Activation state lives in buffers so checkpoints restore it exactly; the range
            # is an EMA over training batches, so observation goes on through training.
            self.register_buffer("range", torch.tensor(0.0))
            self._register_calibration("calibrated")
            self._register_sign(signed)
            self.tracks_during_training = True

    def accepts_ternary(self, role: str) -> bool:
        # the narrow signed weight grid at 2 bits is {-s, 0, s}; __init__ checks the options
        return role == "weight"

    # -- range estimation -------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as float rows: one per output channel (per-channel weights) or one row."""
        x = x.detach().float()
        return x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)

    def _estimate_range(self, x: Tensor) -> Tensor:
        """Range of ``x`` per channel (weights) or per tensor, by the configured method."""
        rows = self._rows(x)
        if self.role == "activation" and rows.shape[1] > self.calib_samples:
            # A strided subsample keeps the MSE search cheap on large activation maps.
            stride = rows.shape[1] // self.calib_samples
            sample = rows[:, ::stride]
        else:
            sample = rows
        signed = self._is_signed()
        if self.scale_method == "max_abs":
            rng = max_abs_rows(rows, signed)
        else:
            rng = mse_optimal_range(sample, self.bits, signed, self.signed_grid)
        return rng if self.per_channel else rng.reshape(())

    def _is_signed(self) -> bool:
        if self.role == "weight":
            return self.signed
        return super()._is_signed()

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold a training batch into the activation range (EMA); weights: search their range."""
        if self.role == "weight":
            if self.scale_method == "mse":
                self.search(x)
            return
        self._decide_sign(x)
        rng = self._estimate_range(x)
        if not self.is_calibrated():
            self.range.copy_(rng)
            self._set_calibrated()
        else:
            self.range.lerp_(rng, self.momentum)

    # -- weights: searched ratio kept between searches ------------------------------------------
    @torch.no_grad()
    def search(self, w: Tensor) -> None:
        """Run the MSE search on the weight ``w`` and keep its clipping ratio per channel."""
        ratio, _ = mse_clip_ratio(self._rows(w), self.bits, self.signed, self.signed_grid)
        if self.clip_ratio.shape == ratio.shape:
            self.clip_ratio.copy_(ratio)
        else:
            self.clip_ratio = ratio  # first search: the buffer takes the channel count
        self._has_ratio = True

    def refresh(self, w: Tensor, step: int) -> None:
        """After optimizer step ``step``: search ``w`` again every ``search_every`` steps."""
        if self.role != "weight" or self.scale_method != "mse":
            return
        if not self._has_ratio or step % self.search_every == 0:
            self.search(w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # The ratio buffer is sized by the first search: take the checkpoint's size.
        saved = state_dict.get(prefix + "clip_ratio")
        if self.role == "weight" and saved is not None:
            self.clip_ratio = torch.empty_like(saved, device=self.clip_ratio.device)
            self._has_ratio = saved.numel() > 0
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _weight_range(self, w: Tensor) -> Tensor:
        """Range of a weight tensor.

        Training forwards with a searched ratio of matching shape: that ratio times the current
        max |w| (no search, no host sync: the forward compiles whole). Otherwise (evaluation,
        max-abs, no search yet) the configured method on ``w``, cached while the parameter is
        unchanged: evaluation and logging ask many times for the same weights, and an in-place
        optimizer step bumps the parameter's version counter, which invalidates the cache.
        """
        if (
            self.training
            and self._has_ratio
            and self.scale_method == "mse"
            and self.clip_ratio.shape[0] == (w.shape[0] if self.per_channel else 1)
        ):
            rng = self.clip_ratio * max_abs_rows(self._rows(w), self.signed)
            return rng if self.per_channel else rng.reshape(())
        if not isinstance(w, nn.Parameter) or torch.compiler.is_compiling():
            return self._estimate_range(w)
        key = (w.data_ptr(), w._version, tuple(w.shape), self.bits)
        cached = self._range_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        rng = self._estimate_range(w)
        self._range_cache = (key, rng)
        return rng

    def grid(self, x: Tensor) -> Grid:
        if self.role == "weight":
            rng = channel_view(self._weight_range(x), x, self.per_channel)
            return grid_for_range(rng, self.bits, self.signed, self.signed_grid)
        self._require_calibrated()
        return grid_for_range(self.range, self.bits, self._is_signed(), self.signed_grid)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, role={self.role}, per_channel={self.per_channel}, "
            f"scale_method={self.scale_method}, signed_grid={self.signed_grid}, "
            f"search_every={self.search_every}"
        )
