from gist_scale.loss import GISTLoss

__all__ = ["GISTLoss"]
