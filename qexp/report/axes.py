"""What `qexp compare` plots: one description per x axis and one per metric.

Every place that used to branch on the x axis (figure, table title, TensorBoard tags) reads
the axis' fields instead, so a new axis or metric is one more instance here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qexp.errors import QexpError
from qexp.report.runs import Group


@dataclass(frozen=True)
class Metric:
    """A run result `qexp compare` summarises over seeds (a metrics.json key)."""

    key: str
    #: y label of the figure
    label: str
    #: the metric in a title ("# Accuracy against bit width") and in file names (lower case)
    name: str
    #: the table's footnote: what the number is
    note: str
    higher_is_better: bool
    digits: int = 4

    @property
    def file_word(self) -> str:
        """The metric in file names and TensorBoard tags: "accuracy" in accuracy_vs_bits."""
        return self.name.lower().replace(" ", "_")


TEST_ACC = Metric(
    key="test_acc",
    label="test accuracy (hard-quantized)",
    name="Accuracy",
    note="test_acc: hard-quantized test accuracy of the best epoch.",
    higher_is_better=True,
)
TEST_BPC = Metric(
    key="test_bpc",
    label="test bits per character (lower is better)",
    name="BPC",
    note="test_bpc: test bits per character of the best epoch (lower is better).",
    higher_is_better=False,
)
TEST_LOSS = Metric(
    key="test_loss",
    label="test loss (lower is better)",
    name="Loss",
    note="test_loss: test cross-entropy of the best epoch (lower is better).",
    higher_is_better=False,
)
#: in order of preference when the runs report several
METRICS = {m.key: m for m in (TEST_ACC, TEST_BPC, TEST_LOSS)}


@dataclass(frozen=True)
class Axis:
    """The figure's x axis."""

    key: str  # the --x choice
    words: str  # "bit width", in titles
    label: str  # x label of the figure
    #: where a group sits on the axis (None: it cannot be placed)
    value: Callable[[Group], float | None]
    #: True: one line per quantizer + estimator whatever else differs (a budget sweep is one
    #: line), with the Pareto front ringed; False: one line per setting series
    cost: bool
    #: base of the logarithmic scale (None: linear)
    log_base: float | None = None
    #: ticks at the points' integer values, labelled as integers (bit widths)
    integer_ticks: bool = False
    #: appended to the TensorBoard scalar tag ("compare/test_acc_vs_kb")
    tb_suffix: str = ""

    def figure_name(self, metric: Metric) -> str:
        """The figure's file name, e.g. accuracy_vs_bits.png."""
        return f"{metric.file_word}_vs_{self.key}.png"

    def tb_tag(self, metric: Metric) -> str:
        """The scalar tag of the lines (``_std``, ``_min``, ``_max`` are appended)."""
        return f"compare/{metric.key}{self.tb_suffix}"


BITS = Axis(
    key="bits",
    words="bit width",
    label="weight bits (w_bits)",
    value=lambda g: float(g.w_bits),
    cost=False,
    log_base=2,
    integer_ticks=True,
)
WEIGHT_KB = Axis(
    key="weight_kb",
    words="weight memory",
    label="weight memory (KB)",
    value=lambda g: g.mean_of("weight_kb"),
    cost=True,
    tb_suffix="_vs_kb",
)
BOPS = Axis(
    key="bops",
    words="bit operations",
    label="bit operations per sample (BOPs = MACs x w_bits x a_bits)",
    value=lambda g: g.mean_of("bops"),
    cost=True,
    log_base=10,
    tb_suffix="_vs_bops",
)
AXES = {a.key: a for a in (BITS, WEIGHT_KB, BOPS)}


def axis(key: str) -> Axis:
    """The axis called ``key`` (a QexpError naming the choices otherwise)."""
    if key not in AXES:
        raise QexpError(f"--x must be one of {', '.join(AXES)}, not {key!r}")
    return AXES[key]


def metric(key: str) -> Metric:
    """The metric called ``key`` (a QexpError naming the choices otherwise)."""
    if key not in METRICS:
        raise QexpError(f"--metric must be one of {', '.join(METRICS)}, not {key!r}")
    return METRICS[key]
