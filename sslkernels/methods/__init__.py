"""Method classes: thin modules that compose the kernels into SimCLR, MoCo v2, BYOL and SimSiam.

Every method exposes the same small interface::

    loss = method.training_step((view0, view1))     # forward + loss, ready for .backward()
    optimizer.step()
    method.after_optimizer_step(step, total_steps)   # EMA targets, schedules
    features = method(images)                        # backbone features for downstream use
"""
from .backbones import SmallConvNet, resnet_backbone
from .byol import BYOL
from .mocov2 import MoCoV2
from .simclr import SimCLR
from .simsiam import SimSiam

__all__ = ["SimCLR", "MoCoV2", "BYOL", "SimSiam", "resnet_backbone", "SmallConvNet"]
