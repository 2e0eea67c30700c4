"""Task evaluations under sparsity policies, and the side-by-side comparison (``compare``)."""

from .evaluate import Evaluator, evaluate_task, right_pad

__all__ = ["Evaluator", "evaluate_task", "right_pad"]
