"""Sparsity policies (dense, oracle, online, static, predictor) behind one interface."""

from .base import (MODES, DensePolicy, OnlinePolicy, PolicyOutput, SparsityPolicy, StaticPolicy,
                   account, make_policy, model_logits)
from .oracle import OraclePolicy

__all__ = ["MODES", "DensePolicy", "OnlinePolicy", "OraclePolicy", "PolicyOutput", "SparsityPolicy",
           "StaticPolicy", "account", "make_policy", "model_logits"]
