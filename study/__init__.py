"""study: does ImageNet pre-training transfer non-robustness? (Zhang et al.)"""
