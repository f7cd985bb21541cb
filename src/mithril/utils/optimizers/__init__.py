"""Backend-agnostic optimizers: the math is written once, each backend runs it fast."""

from .adagrad import AdaGrad
from .adam import Adam, AdamW
from .base import Optimizer, infer_backend
from .clipping import clip_gradients, global_norm
from .rmsprop import RMSProp
from .sgd import SGD
from .state import OptimizerState

__all__ = ["AdaGrad", "Adam", "AdamW", "Optimizer", "OptimizerState", "RMSProp", "SGD",
           "clip_gradients", "global_norm", "infer_backend"]
