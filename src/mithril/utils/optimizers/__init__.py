"""Backend-agnostic optimizers: the math is written once, each backend runs it fast."""

from .acprop import AcProp
from .adabelief import AdaBelief
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import AdaGrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .adan import Adan
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .asgd import ASGD
from .averaging import NoAverageError
from .base import Optimizer
from .checks import infer_backend
from .clipping import clip_gradients, global_norm
from .cocob import COCOB
from .dadapt_adamw import DAdaptAdamW
from .differentially_private import (
    DPSGD,
    DifferentiallyPrivate,
    PrivacyAccountant,
    get_epsilon,
    get_noise_multiplier,
)
from .dimension_numbers import DimensionNumbers
from .dog import DoG, DoWG
from .engines.threads import get_num_threads, set_num_threads
from .fromage import Fromage
from .ftrl import Ftrl
from .galore import GaLore
from .lamb import LAMB
from .lars import LARS
from .lbfgs import LBFGS
from .lion import Lion
from .lookahead import Lookahead
from .madgrad import MADGRAD
from .mechanize import Mechanize
from .momo import Momo, MomoAdam
from .muon import Muon
from .nadam import NAdam
from .noisy_sgd import NoisySGD
from .novograd import Novograd
from .optimistic import OptimisticAdam, OptimisticGD
from .polyak_sgd import PolyakSGD
from .prodigy import Prodigy
from .radam import RAdam
from .rmsprop import RMSProp
from .rprop import Rprop
from .sam import SAM
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD
from .schedule_free_wrapper import ScheduleFree
from .sgd import SGD
from .sign_sgd import SignSGD, Signum
from .simplified_ademamix import SimplifiedAdEMAMix
from .sm3 import SM3
from .sophia import Sophia
from .state import OptimizerState
from .yogi import Yogi

__all__ = ["ADOPT", "ASGD", "AdEMAMix", "AdaBelief", "AdaGrad", "Adadelta", "Adam", "AdamW",
           "Adafactor", "Adamax", "Adan", "Ftrl", "Muon", "LAMB", "LARS", "Novograd", "LBFGS", "Lion", "Lookahead", "NAdam", "NoAverageError", "Optimizer", "OptimizerState", "RAdam",
           "Prodigy", "RMSProp", "Rprop", "SGD", "ScheduleFree", "ScheduleFreeAdamW", "ScheduleFreeSGD", "Yogi",
           "COCOB", "OptimisticAdam", "OptimisticGD", "SignSGD", "Signum", "SimplifiedAdEMAMix",
           "DoG", "DoWG", "Fromage", "AcProp", "DAdaptAdamW", "SM3", "Sophia",
           "NoisySGD", "MADGRAD", "Mechanize", "SAM", "Momo", "MomoAdam", "PolyakSGD", "GaLore",
           "DPSGD", "DifferentiallyPrivate", "DimensionNumbers",
           "PrivacyAccountant", "get_epsilon", "get_noise_multiplier",
           "clip_gradients", "get_num_threads", "global_norm", "infer_backend", "set_num_threads"]

def __getattr__(name: str) -> object:
    """A clear error for another library's spelling of a class here (torch's and Keras'
    ``RMSprop``, ``Adagrad``, ``Nadam``, ``Lamb``: ours differ in case only)."""
    ours = next((n for n in __all__ if n.lower() == name.lower()), None)
    hint = f": ours is spelled {ours}" if ours is not None else ""
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}{hint}")
