"""Evaluation of (quantized) classifiers: metrics, latency, the report table/JSON and its plot."""

from jaxq.eval.latency import measure_latency
from jaxq.eval.metrics import classification_metrics, confusion_matrix, make_predict_fn, predict
from jaxq.eval.plot import plot_results
from jaxq.eval.report import Report, StrategyResult, format_bytes, format_table, write_json

__all__ = [
    "Report",
    "StrategyResult",
    "classification_metrics",
    "confusion_matrix",
    "format_bytes",
    "format_table",
    "make_predict_fn",
    "measure_latency",
    "plot_results",
    "predict",
    "write_json",
]
