"""Method classes: thin modules that compose the kernels into SimCLR, SimCLR v2, MoCo v2, BYOL
and SimSiam.

Every method exposes the same small interface::

    loss = method.training_step((view0, view1))     # forward + loss, ready for .backward()
    optimizer.step()
    method.after_optimizer_step(step, total_steps)   # EMA targets, schedules
    features = method(images)                        # backbone features for downstream use
"""
from .backbones import SmallConvNet, resnet_backbone
from .byol import BYOL
from .heads import head_blocks
from .mocov2 import MoCoV2
from .simclr import SimCLR
from .simclrv2 import SimCLRv2, nt_xent_with_memory
from .simsiam import SimSiam

__all__ = ["SimCLR", "SimCLRv2", "MoCoV2", "BYOL", "SimSiam", "resnet_backbone",
           "SmallConvNet", "head_blocks", "nt_xent_with_memory"]
