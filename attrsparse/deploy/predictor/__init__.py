"""Contextual predictors trained on the oracle's attribution labels (:mod:`.train`) and the
``train-predictor`` run with its held-out report (:mod:`.run`)."""

from .run import evaluate_predictor, print_report, run_train_predictor
from .train import (
                    LABEL_SELECTOR,
                    SCORE_METRIC,
                    PredictorConfig,
                    TrainingData,
                    collect_training_data,
                    train_predictor,
)

__all__ = ["LABEL_SELECTOR", "SCORE_METRIC", "PredictorConfig", "TrainingData", "collect_training_data",
           "evaluate_predictor", "print_report", "run_train_predictor", "train_predictor"]
