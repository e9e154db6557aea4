from memlm.model.accounting import active_params, dense_matched_config, flops_per_token, param_counts
from memlm.model.transformer import MemLM

__all__ = ["MemLM", "active_params", "dense_matched_config", "flops_per_token", "param_counts"]
