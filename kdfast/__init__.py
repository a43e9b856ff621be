"""kdfast: fast, memory-frugal LLM knowledge distillation, and audits of what distillation leaks."""
from kdfast import reference
from kdfast._ext import backends
from kdfast.losses import DistillLoss, FusedLinearDistillLoss
from kdfast.ops.divergence import distill_loss
from kdfast.ops.fused_linear import fused_linear_distill_loss
from kdfast.ops.fused_linear_sparse import fused_linear_sparse_distill_loss
from kdfast.ops.sparse_divergence import sparse_distill_loss
from kdfast.ops.token_stats import TokenStats, min_k, token_stats, token_stats_from_hidden

__version__ = "0.1.0"

__all__ = ["reference", "__version__", "token_stats", "token_stats_from_hidden", "min_k", "TokenStats", "backends",
           "distill_loss", "DistillLoss", "fused_linear_distill_loss", "FusedLinearDistillLoss",
           "sparse_distill_loss", "fused_linear_sparse_distill_loss"]
