"""The GLUE harness: data in the original layout or from the Hub, official metrics, scoring
and fine-tuning any sequence-classification model, side-by-side tables."""

from hfcompress.glue.augment import UNLABELLED, augment_glue
from hfcompress.glue.data import HUB_DATASET, load_glue, read_glue_tsv
from hfcompress.glue.harness import (
    GlueResult,
    evaluate_glue,
    finetune_glue,
    labels_in_model_order,
    load_glue_model,
    markdown_table,
    predict,
    tokenize_glue,
    write_results,
)
from hfcompress.glue.metrics import glue_metrics
from hfcompress.glue.tasks import GLUE_TASKS, GlueDataError, GlueTask, class_order, eval_splits, get_task

__all__ = [
    "GLUE_TASKS",
    "HUB_DATASET",
    "UNLABELLED",
    "GlueDataError",
    "GlueResult",
    "GlueTask",
    "augment_glue",
    "class_order",
    "eval_splits",
    "evaluate_glue",
    "finetune_glue",
    "get_task",
    "glue_metrics",
    "labels_in_model_order",
    "load_glue",
    "load_glue_model",
    "markdown_table",
    "predict",
    "read_glue_tsv",
    "tokenize_glue",
    "write_results",
]
