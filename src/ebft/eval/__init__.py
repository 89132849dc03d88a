"""Evaluation: perplexity over non-overlapping windows; zero-shot multiple-choice accuracy."""

from ebft.eval.perplexity import PerplexityResult, perplexity
from ebft.eval.tasks_local import SUPPORTED_TASKS, parse_tasks
from ebft.eval.zeroshot import TaskResult, ZeroShotResult, evaluate_local, evaluate_zeroshot

__all__ = [
    "PerplexityResult", "SUPPORTED_TASKS", "TaskResult", "ZeroShotResult", "evaluate_local", "evaluate_zeroshot",
    "parse_tasks", "perplexity",
]
