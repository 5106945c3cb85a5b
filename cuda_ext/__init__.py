"""Custom ops of the FlowDCN stack. ``cuda_ext.msdcn`` is the groupwise multi-scale deformable op."""
from .msdcn import IMPLS, cuda_available, deform_offsets_ref, msdcn, msdcn_deform, msdcn_deform_packed, msdcn_ref, split_packed

__all__ = ["msdcn", "msdcn_deform", "msdcn_deform_packed", "split_packed", "msdcn_ref", "deform_offsets_ref", "cuda_available",
           "IMPLS"]
