"""Native decode engine (issue 15): one C call per token over input-major weights.

* :mod:`.pack`: :func:`pack` a transformers model (Llama/SmolLM2, Qwen2, Gemma 3 text) into an
  engine file (fp32, bf16 or int8 weights; screened LM head) in ``<cache root>/engine``;
* :mod:`.runner`: :class:`Engine` maps that file and decodes without torch or numpy;
* :mod:`.sites`: :class:`ChannelRules` / :class:`SiteRule`, the input-channel rules per site;
* :mod:`.convert`: :func:`convert_rules`, a calibrated ``ChannelRuleSet`` (torch) as engine rules;
* :mod:`.bandwidth`, :mod:`.bench`, :mod:`.gguf_convert`, :mod:`.worker`: the measurement pieces.

See docs/engine.md.
"""

from .convert import convert_rules
from .pack import ENGINE_TYPES, engine_arch, pack, unsupported_reason
from .runner import Engine, Generation
from .sites import SITE_PROJECTIONS, SITES, ChannelRules, SiteRule

__all__ = ["ENGINE_TYPES", "SITES", "SITE_PROJECTIONS", "ChannelRules", "Engine", "Generation", "SiteRule",
           "convert_rules", "engine_arch", "pack", "unsupported_reason"]
