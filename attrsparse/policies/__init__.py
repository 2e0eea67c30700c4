"""Sparsity policies (dense, oracle, online, static, predictor) behind one interface, and the one
parser of sparsity specs (:func:`make_policy`)."""

from .base import MODES, Applied, DensePolicy, PolicyOutput, SparsityPolicy, account, with_decision_cost
from .channel import ChannelPolicy, load_channel_policy, read_channels
from .online import OnlinePolicy
from .oracle import OraclePolicy
from .predictor import PredictorPolicy, load_predictor, load_predictor_policy
from .spec import ARTIFACTS, make_policy, parse_spec, register_artifact
from .static import (
           CalibratedStaticPolicy,
           SelectorStaticPolicy,
           StaticPolicy,
           load_static_policy,
           read_static,
)

__all__ = ["ARTIFACTS", "MODES", "Applied", "CalibratedStaticPolicy", "ChannelPolicy", "load_channel_policy",
           "read_channels", "DensePolicy", "OnlinePolicy",
           "OraclePolicy", "PolicyOutput", "PredictorPolicy", "SelectorStaticPolicy", "SparsityPolicy",
           "StaticPolicy", "account", "load_predictor", "load_predictor_policy", "load_static_policy",
           "make_policy", "parse_spec", "read_static", "register_artifact", "with_decision_cost"]
