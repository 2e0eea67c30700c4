"""ctypes mirrors of ``engine.h`` and the loaded engine library (layouts checked at load)."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_double, c_float, c_int32, c_int64, c_uint64, c_void_p

from ..kernels.build import check_layout, load_library

MODE_NONE, MODE_GREEDY_SCREENED, MODE_GREEDY_FULL, MODE_SAMPLE, MODE_GREEDY_CHECK = 0, 1, 2, 3, 4
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu": 2}


MAX_PROJ = 3  # projections of one site (attn_in: q, k, v)
RULE_NONE, RULE_SHARED, RULE_PER_PROJECTION = 0, 1, 2  # EngSite.rule


class EngSite(ctypes.Structure):
    _fields_ = [("scale", c_void_p), ("center", c_void_p), ("keep", c_void_p), ("bias", c_void_p),
                ("threshold", c_float), ("rule", c_int32), ("pscale", c_void_p * MAX_PROJ),
                ("pthreshold", c_float * MAX_PROJ), ("prule", c_int32 * MAX_PROJ)]


class EngLayer(ctypes.Structure):
    _fields_ = [("w", c_void_p * 4), ("wscale", c_void_p * 4), ("wbias", c_void_p * 4), ("norm", c_void_p * 4),
                ("q_norm", c_void_p), ("k_norm", c_void_p), ("inv_freq", c_void_p), ("rope_scale", c_float),
                ("window", c_int32), ("site", EngSite * 4)]


class EngModel(ctypes.Structure):
    _fields_ = [("n_layers", c_int64), ("hidden", c_int64), ("n_heads", c_int64), ("n_kv", c_int64),
                ("head_dim", c_int64), ("inter", c_int64), ("vocab", c_int64), ("wtype", c_int32),
                ("head_type", c_int32), ("emb_type", c_int32), ("act", c_int32), ("eps", c_float),
                ("emb_scale", c_float), ("attn_scale", c_float), ("attn_softcap", c_float),
                ("final_softcap", c_float), ("head_fd", c_int32), ("embed", c_void_p), ("embed_scale", c_void_p),
                ("head", c_void_p), ("head_scale", c_void_p), ("screen", c_void_p), ("screen_scale", c_void_p),
                ("screen_bound", c_void_p), ("final_norm", c_void_p), ("layers", c_void_p),
                ("head_off", c_int64), ("head_lin", c_void_p)]


class EngStep(ctypes.Structure):
    _fields_ = [("token", c_int64), ("threads", c_int32), ("mode", c_int32), ("temperature", c_float),
                ("top_p", c_float), ("logits", c_void_p), ("kept", c_void_p), ("next", c_int64),
                ("linear_reads", c_int64), ("head_bytes", c_int64), ("candidates", c_int64), ("check", c_int64)]


_LIB: ctypes.CDLL | None = None


def engine_library() -> ctypes.CDLL:
    """Build (once per source, cached) and load ``engine.c`` with its prototypes set.

    Raises :class:`attrsparse.deploy.kernels.build.KernelBuildError` without a working compiler."""
    global _LIB
    if _LIB is not None:
        return _LIB
    lib = load_library("engine")
    for struct in (EngSite, EngLayer, EngModel, EngStep):
        check_layout(lib, struct)
    protos = {
        "eng_state_new": (c_void_p, [POINTER(EngModel), c_int64, c_int32, c_uint64, c_int32]),
        "eng_state_free": (None, [c_void_p]),
        "eng_state_reset": (None, [c_void_p, c_uint64]),
        "eng_state_pos": (c_int64, [c_void_p]),
        "eng_step": (c_int64, [POINTER(EngModel), c_void_p, POINTER(EngStep)]),
        "eng_linear": (c_int64, [c_int32, c_void_p, c_void_p, c_int64, c_int64, c_void_p, POINTER(EngSite),
                                 c_int32, c_void_p, c_void_p, c_void_p, c_void_p, c_int32]),
        "eng_head": (c_int64, [POINTER(EngModel), c_void_p, c_void_p, POINTER(EngStep)]),
        "eng_map": (c_void_p, [ctypes.c_char_p, POINTER(c_int64), c_int32, c_int64, c_int64]),
        "eng_unmap": (None, [c_void_p, c_int64, c_int32]),
        "eng_bandwidth": (c_double, [c_int64, c_int32, c_int32, c_int32]),
    }
    for name, (res, args) in protos.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _LIB = lib
    return lib
