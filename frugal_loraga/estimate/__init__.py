"""The LoRA-GA gradient estimate: the full fine-tuning gradient dL/dW of every target layer, streamed a group of
layers at a time within a memory budget, and its top-2r SVD.

  tap.py     GradientTap: a target that adds dY^T X into an fp32 accumulator in backward
  plan.py    the layers cut into groups that fit the budget, each group's backward bounds, the inputs worth keeping
  inputs.py  the inputs each decoder layer (block) gets, kept on the CPU by the top group for the groups below
  walk.py    estimate_gradient_svd: the groups walked top down over all batches, each reduced to its SVD
"""
from .tap import GradientTap, accumulate_outer
from .walk import EstimationStats, estimate_gradient_svd

__all__ = ["EstimationStats", "GradientTap", "accumulate_outer", "estimate_gradient_svd"]
