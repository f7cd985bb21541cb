"""Backend-agnostic optimizers: the math is written once, each backend runs it fast."""

from .adagrad import AdaGrad
from .adam import Adam, AdamW
from .base import Optimizer
from .checks import infer_backend
from .clipping import clip_gradients, global_norm
from .engines.threads import get_num_threads, set_num_threads
from .rmsprop import RMSProp
from .sgd import SGD
from .state import OptimizerState

__all__ = ["AdaGrad", "Adam", "AdamW", "Optimizer", "OptimizerState", "RMSProp", "SGD",
           "clip_gradients", "get_num_threads", "global_norm", "infer_backend", "set_num_threads"]
