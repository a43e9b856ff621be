"""kdfast: fast, memory-frugal LLM knowledge distillation, and audits of what distillation leaks."""
from kdfast import reference
from kdfast._ext import backends
from kdfast.ops.token_stats import TokenStats, min_k, token_stats, token_stats_from_hidden

__version__ = "0.1.0"

__all__ = ["reference", "__version__", "token_stats", "token_stats_from_hidden", "min_k", "TokenStats", "backends"]
