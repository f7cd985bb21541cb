"""Backend-agnostic optimizers: the math is written once, each backend runs it fast."""

from .adadelta import Adadelta
from .adagrad import AdaGrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .base import Optimizer
from .checks import infer_backend
from .clipping import clip_gradients, global_norm
from .engines.threads import get_num_threads, set_num_threads
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSProp
from .rprop import Rprop
from .sgd import SGD
from .state import OptimizerState

__all__ = ["ASGD", "AdaGrad", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam", "Optimizer",
           "OptimizerState", "RAdam", "RMSProp", "Rprop", "SGD",
           "clip_gradients", "get_num_threads", "global_norm", "infer_backend", "set_num_threads"]
