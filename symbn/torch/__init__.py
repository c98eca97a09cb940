"""symbn's normalizations in PyTorch: ``torch.nn.functional``'s functions and ``torch.nn``'s
modules on symbn's kernels, exact at every derivative order (reverse and forward mode), as
registered custom ops (``torch.ops.symbn.*``) that ``torch.compile`` traces.

Needs the ``torch`` extra (``pip install 'symbn[torch]'``, pinned).
"""
from .distributed import SyncBatchNorm, SyncNorm, convert_sync_batchnorm
from .functional import batch_norm, group_norm, instance_norm, layer_norm, normalize, rms_norm
from .nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
                 LayerNorm, Norm, RMSNorm, convert)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "LayerNorm", "Norm", "RMSNorm", "SyncBatchNorm", "SyncNorm", "batch_norm", "convert", "convert_sync_batchnorm",
           "group_norm", "instance_norm", "layer_norm", "normalize", "rms_norm"]
