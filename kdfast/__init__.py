"""kdfast: fast, memory-frugal LLM knowledge distillation, and audits of what distillation leaks."""
from kdfast import reference

__version__ = "0.1.0"

__all__ = ["reference", "__version__"]
