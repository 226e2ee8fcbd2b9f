"""SAM and its helpers."""

from sam_bench.optim.bn import batchnorm_modules, running_stats_frozen, set_bn_eval
from sam_bench.optim.factory import build_optimizer, build_scheduler, effective_rho
from sam_bench.optim.sam import SAM, global_norm

__all__ = [
    "SAM",
    "batchnorm_modules",
    "build_optimizer",
    "build_scheduler",
    "effective_rho",
    "global_norm",
    "running_stats_frozen",
    "set_bn_eval",
]
