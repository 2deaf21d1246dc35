"""A run's HParams plugin record: which columns exist, this run's values, how it ended.

TensorBoard's HParams tab reads three summaries per run (the experiment, the session start
with the hparam values, the session end with the status) plus, for each metric column, the
last value of a scalar tag in the same run. `torch.utils.tensorboard.SummaryWriter.add_hparams`
declares only the metrics it is handed and writes them under ``hparam/``, a tag group that
sorts before ``test``; tensorboard's own ``plugins.hparams.summary`` needs TensorFlow. So the
protos are built here from tensorboard's ``api_pb2`` / ``plugin_data_pb2`` and the metric
columns point at the run's own ``test/``, ``val/`` scalars.

Every run declares the whole experiment, since TensorBoard takes the columns from the first
run it finds that declares one. Its HParams tab (2.21) ticks five hparam columns and five metric
columns at first: hparams sorted by ``differs`` (True first), then by name. The ones telling a
sweep's runs apart (:data:`VARYING` and command-line knobs) are marked ``differs``, so they are
the ones shown; the rest are a tick away in the tab's left pane.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qexp.record import RESULT_FREE_KEYS

#: hparam columns of every run (metrics.json keys)
HPARAMS = ("estimator", "w_bits", "a_bits", "seed", "quantizer", "model", "dataset", "lr", "epochs")
#: columns declared ``differs``: what tells apart the runs of a sweep, shown first
VARYING = ("estimator", "w_bits", "a_bits", "seed")
#: metric columns: metrics.json key -> the scalar tag TensorBoard reads it from
METRICS = {
    "test_acc": "test/acc",
    "best_val_acc": "val/best_acc",
    "test_acc_latent": "test/acc_latent",
    "weight_kb": "test/weight_kb",
    "train_time_s": "train/time_s",
}
#: metric tags the trainer logs itself; the others are written by :func:`write_hparams`
_LOGGED_BY_TRAINER = {"test/acc", "test/acc_latent"}
_DESCRIPTIONS = {
    "test_acc": "test accuracy of the hard-quantized network (best validation epoch)",
    "best_val_acc": "best validation accuracy (the epoch that was tested)",
    "test_acc_latent": "test accuracy with the latent float weights (no quantization)",
    "weight_kb": "packed weight memory in KB",
    "train_time_s": "training time in seconds (without evaluation)",
}
#: override keys that are no knobs: covered by a column, or not changing results
_NOT_KNOBS = {
    "estimator",
    "quantizer",
    "model",
    "dataset",
    "bits",
    "w_bits",
    "a_bits",
    "seed",
    "trainer.lr",
    "trainer.epochs",
    "experiment",
    *RESULT_FREE_KEYS,
}
RUN_TEXT_TAG = "run"


def knobs(run_dir: Path) -> dict[str, Any]:
    """Settings given on this run's command line beyond the standard columns (e.g. a swept
    ``quantizer.weight_budget_kb``), from Hydra's ``.hydra/overrides.yaml``; {} without it."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):  # a knob column less; never worth failing a run for
        return {}
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.lstrip("+~")
        if not sep or key in _NOT_KNOBS or key.startswith("hydra."):
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out[key] = value
    return out


def _hparam_value(value: Any) -> Any:
    """A value the HParams tab can show: bool, number or string (null and lists as JSON)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def _summary(tag: str, data: Any):
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata

    content = data.SerializeToString()
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content)
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def hparam_values(metrics: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The run's hparam columns: the standard ones from ``metrics`` (metrics.json fields; a
    missing one is left out), then ``extra`` (knobs; null shown as text)."""
    values = {k: metrics[k] for k in HPARAMS if metrics.get(k) is not None}
    values.update(extra)
    return {k: _hparam_value(v) for k, v in values.items()}


def experiment_summaries(values: Mapping[str, Any], completed: bool) -> list:
    """The three HParams summaries (experiment, session start, session end) for one run."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos = []
    start = plugin_data_pb2.SessionStartInfo()
    for name, value in values.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
            kind = api_pb2.DATA_TYPE_BOOL
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
            kind = api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value = str(value)
            kind = api_pb2.DATA_TYPE_STRING
        # no domain: one run cannot know the others' values, and a declared list would make
        # the tab's filter hide runs with values outside it
        differs = name in VARYING or name not in HPARAMS  # knobs are what a sweep varies
        infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=differs))
    metric_infos = [
        api_pb2.MetricInfo(
            name=api_pb2.MetricName(tag=tag), display_name=key, description=_DESCRIPTIONS[key]
        )
        for key, tag in METRICS.items()
    ]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)
    status = api_pb2.STATUS_SUCCESS if completed else api_pb2.STATUS_FAILURE
    end = plugin_data_pb2.SessionEndInfo(status=status)
    version = metadata.PLUGIN_DATA_VERSION
    return [
        _summary(
            metadata.EXPERIMENT_TAG,
            plugin_data_pb2.HParamsPluginData(experiment=experiment, version=version),
        ),
        _summary(
            metadata.SESSION_START_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_start_info=start, version=version),
        ),
        _summary(
            metadata.SESSION_END_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_end_info=end, version=version),
        ),
    ]


def run_markdown(values: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The run's settings and results as a two-column Markdown table (the Text tab)."""
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in values.items()]
    for key in ("status", "reason", *METRICS):
        value = metrics.get(key)
        if value is not None:
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def write_hparams(writer: Any, metrics: Mapping[str, Any], run_dir: Path, step: int) -> None:
    """Declare the run's HParams experiment and session in ``writer`` (a SummaryWriter on
    ``run_dir``), log the metric columns the trainer does not log itself, and put the run's
    settings and results in the Text tab.

    ``metrics``: the run's metrics.json content (identity fields, status, results).
    """
    for key, tag in METRICS.items():
        value = metrics.get(key)
        if tag not in _LOGGED_BY_TRAINER and isinstance(value, (int, float)):
            writer.add_scalar(tag, float(value), step)
    values = hparam_values(metrics, knobs(run_dir))
    completed = str(metrics.get("status", "")).startswith("completed")
    file_writer = writer._get_file_writer()  # the writer's own event file: one run, not two
    for summary in experiment_summaries(values, completed):
        file_writer.add_summary(summary, step)
    writer.add_text(RUN_TEXT_TAG, run_markdown(values, metrics), step)
