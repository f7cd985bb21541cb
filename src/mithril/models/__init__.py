"""Logical models: operators, composite blocks and :class:`Model`."""

from .activations import (
    Celu,
    Elu,
    Gelu,
    Glu,
    Hardsigmoid,
    Hardswish,
    Hardtanh,
    LeakyRelu,
    LogSoftmax,
    Mish,
    Relu,
    Selu,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
)
from .activations_more import Hardshrink, LogSigmoid, PReLU, Softshrink, Softsign
from .arithmetic import Add, MatrixMultiply, Multiply
from .blocks import MLP
from .conv import Convolution1D, Convolution2D
from .conv_transpose import ConvTranspose1D, ConvTranspose2D
from .dropout import Dropout
from .layers import Embedding, Flatten, LayerNorm, Linear
from .losses import CrossEntropy, HuberLoss, MeanSquaredError, SmoothL1Loss, SquaredError
from .model import Bound, Connection, Model
from .norms import BatchNorm1D, BatchNorm2D, GroupNorm, InstanceNorm1D, InstanceNorm2D, RMSNorm
from .operator import Operator
from .pooling import AvgPool1D, AvgPool2D, GlobalAvgPool2D, MaxPool1D, MaxPool2D

__all__ = [
    "Add", "Bound", "Connection", "CrossEntropy", "Embedding", "Flatten", "Gelu", "LayerNorm",
    "LeakyRelu", "Linear", "MLP", "MatrixMultiply", "MeanSquaredError", "Model", "Multiply",
    "Operator", "Relu", "Sigmoid", "Softmax", "SquaredError", "Tanh",
    "AvgPool1D", "AvgPool2D", "Convolution1D", "Convolution2D", "ConvTranspose1D", "ConvTranspose2D",
    "GlobalAvgPool2D", "GroupNorm",
    "MaxPool1D", "MaxPool2D", "BatchNorm1D", "BatchNorm2D", "Dropout", "RMSNorm",
    "Celu", "Elu", "Hardsigmoid", "Hardswish", "Mish", "Selu", "Softplus",
    "HuberLoss", "SmoothL1Loss",
    "Glu", "Hardtanh", "LogSoftmax", "Silu", "InstanceNorm1D", "InstanceNorm2D",
    "Hardshrink", "LogSigmoid", "PReLU", "Softshrink", "Softsign",
]

# primitives (the published Mithril's names)
from .arange import Arange  # noqa: E402
from .connection_types import Tensor  # noqa: E402 (IOKey(type=Tensor[float]), as published)
from .list_wires import ToList, ToTuple  # noqa: E402
from .model import IOKey  # noqa: E402
from .primitives import (  # noqa: E402
    Absolute,
    Buffer,
    Cast,
    Divide,
    Exponential,
    Log,
    Negate,
    Power,
    Sqrt,
    Square,
    Subtract,
    Where,
)
from .reductions import Max, Mean, Min, Sum  # noqa: E402
from .shape_wires import Shape, ShapeWire, Size  # noqa: E402
from .shaping import Concat, Indexer, Reshape, Split, Transpose  # noqa: E402

__all__ += [
    "Absolute", "Buffer", "Cast", "Concat", "Tensor", "Divide", "Exponential", "IOKey", "Indexer", "Log", "Max",
    "Mean", "Min", "Negate", "Power", "Reshape", "Split", "Sqrt", "Square", "Subtract", "Sum",
    "ToList", "ToTuple",
    "Transpose", "Where", "Shape", "ShapeWire", "Size", "Arange",
]

# attention, transformer blocks and position embeddings
from .attention import MultiHeadAttention, ScaledDotProduct  # noqa: E402
from .attention_weights import AttentionWeights  # noqa: E402
from .positional import PositionalEmbedding, PositionalEncoding  # noqa: E402
from .transformer import ExactGelu, TransformerBlock, TransformerDecoderBlock  # noqa: E402

__all__ += [
    "AttentionWeights", "ExactGelu", "MultiHeadAttention", "PositionalEmbedding",
    "PositionalEncoding", "ScaledDotProduct", "TransformerBlock", "TransformerDecoderBlock",
]

# training models (the published Mithril's TrainModel)
from .regularizers import L1, L2  # noqa: E402
from .train_model import TrainModel  # noqa: E402

__all__ += ["L1", "L2", "TrainModel"]

# recurrent layers
from .recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, Recurrence, RNNCell  # noqa: E402

__all__ += ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "Recurrence"]

# the published Mithril's elementwise and probability losses
from .pointwise_losses import AbsoluteError, HingeLoss, QuadHingeLoss, QuantileLoss  # noqa: E402
from .probability_losses import BinaryCrossEntropy, KLDivergence  # noqa: E402

__all__ += ["AbsoluteError", "BinaryCrossEntropy", "HingeLoss", "KLDivergence", "QuadHingeLoss",
            "QuantileLoss"]

# the published Mithril's statistics and elementwise primitives
from .permute_tensor import PermuteTensor  # noqa: E402
from .statistics import Variance  # noqa: E402
from .unary_primitives import Cosine, Sine, StableReciprocal, StopGradient  # noqa: E402

__all__ += ["Cosine", "PermuteTensor", "Sine", "StableReciprocal", "StopGradient", "Variance"]

# the published Mithril's regression models
from .regression_models import (  # noqa: E402
    LogisticRegression,
    PolynomialFeatures,
    PolynomialRegression,
)

__all__ += ["LogisticRegression", "PolynomialFeatures", "PolynomialRegression"]

from .distance_models import EncoderDistanceMatrix  # noqa: E402
from .kernel_models import PolynomialKernel, RBFKernel  # noqa: E402

__all__ += ["EncoderDistanceMatrix", "PolynomialKernel", "RBFKernel"]

# the published Mithril's integer primitives and product reduction
from .integer_primitives import FloorDivide, ShiftLeft, ShiftRight  # noqa: E402
from .reductions import Prod  # noqa: E402

__all__ += ["FloorDivide", "Prod", "ShiftLeft", "ShiftRight"]

from .comparisons import (  # noqa: E402
    Equal,
    Greater,
    GreaterEqual,
    Less,
    LessEqual,
    LogicalAnd,
    LogicalNot,
    LogicalOr,
    LogicalXOr,
    NotEqual,
)

__all__ += ["Equal", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd", "LogicalNot",
            "LogicalOr", "LogicalXOr", "NotEqual"]

from .activations import Silu as SiLU  # noqa: E402  (the published name)
from .connection_types import TBD  # noqa: E402
from .tensor_creation import (  # noqa: E402
    ArgMax,
    ArgMin,
    BroadcastTo,
    Maximum,
    Minimum,
    Ones,
    ZerosLike,
)

__all__ += ["SiLU", "TBD", "ArgMax", "ArgMin", "BroadcastTo", "Maximum", "Minimum", "Ones",
            "ZerosLike"]

from .blocks import Layer  # noqa: E402
from .random_blocks import RandInt, Randn  # noqa: E402
from .scalar_blocks import Item, Slice, ToTensor  # noqa: E402
from .tensor_to_list import TensorToList  # noqa: E402

__all__ += ["Item", "Layer", "RandInt", "Randn", "Slice", "TensorToList", "ToTensor"]

from .published_elementwise import (  # noqa: E402
    AtLeast1D,
    Clamp,
    Eye,
    Floor,
    IsNan,
    NanToNum,
    Squeeze,
    SwapAxes,
)

__all__ += ["AtLeast1D", "Clamp", "Eye", "Floor", "IsNan", "NanToNum", "Squeeze", "SwapAxes"]

# the published Mithril's Gaussian-process regression and its linear-algebra primitives
from .gp_regression import (  # noqa: E402
    AddDiagonal,
    GaussProcessRegressionCore,
    GPRLoss,
    SymmetricSolve,
    TransposedDiagonal,
)

__all__ += ["AddDiagonal", "GPRLoss", "GaussProcessRegressionCore", "SymmetricSolve",
            "TransposedDiagonal"]

# the published Mithril's multidimensional scaling
from .mds import MDS, MDSCore  # noqa: E402
from .unary_primitives import NormModifier  # noqa: E402

__all__ += ["MDS", "MDSCore", "NormModifier"]

# the published Mithril's recurrent cells, in its layout
from .published_cells import (  # noqa: E402
    EncoderDecoder,
    EncoderDecoderInference,
    ManyToOne,
    OneToMany,
    OneToManyInference,
    PublishedLSTMCell,
    PublishedRNNCell,
    RowsOf,
)
from .time_slots import pack_data_into_time_slots  # noqa: E402

__all__ += ["EncoderDecoder", "EncoderDecoderInference", "ManyToOne", "OneToMany",
            "OneToManyInference", "PublishedLSTMCell", "PublishedRNNCell", "RowsOf",
            "pack_data_into_time_slots"]

# the published Mithril's support-vector machines
from .svm import KernelizedSVM, LinearSVM, QuadraticFormRegularizer, Sign  # noqa: E402

__all__ += ["KernelizedSVM", "LinearSVM", "QuadraticFormRegularizer", "Sign"]

# torch's margin, embedding and likelihood losses
from .likelihood_losses import GaussianNLLLoss, PoissonNLLLoss  # noqa: E402
from .margin_losses import (  # noqa: E402
    CosineEmbeddingLoss,
    HingeEmbeddingLoss,
    MarginRankingLoss,
    SoftMarginLoss,
    TripletMarginLoss,
)
from .multiclass_margin_losses import (  # noqa: E402
    MultiLabelMarginLoss,
    MultiLabelSoftMarginLoss,
    MultiMarginLoss,
)

__all__ += ["CosineEmbeddingLoss", "GaussianNLLLoss", "HingeEmbeddingLoss", "MarginRankingLoss",
            "MultiLabelMarginLoss", "MultiLabelSoftMarginLoss", "MultiMarginLoss",
            "PoissonNLLLoss", "SoftMarginLoss", "TripletMarginLoss"]

# torch.nn's small modules (and torch-named aliases of blocks Mithril names its own way)
from .activations_torch_extra import (  # noqa: E402
    CELU,
    SELU,
    Identity,
    ReLU6,
    RReLU,
    Softmin,
    Tanhshrink,
    Threshold,
)
from .bilinear import Bilinear  # noqa: E402
from .local_response_norm import LocalResponseNorm  # noqa: E402
from .nll_loss import NLLLoss  # noqa: E402
from .similarity import CosineSimilarity, PairwiseDistance  # noqa: E402
from .unflatten import Unflatten  # noqa: E402

__all__ += ["Bilinear", "CELU", "CosineSimilarity", "Identity", "LocalResponseNorm", "NLLLoss",
            "PairwiseDistance", "RReLU", "ReLU6", "SELU", "Softmin", "Tanhshrink", "Threshold",
            "Unflatten"]

# torch's adaptive pools, padding layers and resizing
from .adaptive_pooling import (  # noqa: E402
    AdaptiveAvgPool1D,
    AdaptiveAvgPool2D,
    AdaptiveMaxPool1D,
    AdaptiveMaxPool2D,
)
from .padding import (  # noqa: E402
    CircularPad1D,
    CircularPad2D,
    ConstantPad1D,
    ConstantPad2D,
    Pad,
    ReflectionPad1D,
    ReflectionPad2D,
    ReplicationPad1D,
    ReplicationPad2D,
    ZeroPad1D,
    ZeroPad2D,
)
from .resampling import PixelShuffle, PixelUnshuffle, Upsample  # noqa: E402

__all__ += ["AdaptiveAvgPool1D", "AdaptiveAvgPool2D", "AdaptiveMaxPool1D", "AdaptiveMaxPool2D",
            "CircularPad1D", "CircularPad2D", "ConstantPad1D", "ConstantPad2D", "Pad",
            "PixelShuffle", "PixelUnshuffle", "ReflectionPad1D", "ReflectionPad2D",
            "ReplicationPad1D", "ReplicationPad2D", "Upsample", "ZeroPad1D", "ZeroPad2D"]

# torch's 3-D (volumetric) layers
from .adaptive_pooling import AdaptiveAvgPool3D, AdaptiveMaxPool3D  # noqa: E402
from .conv import Convolution3D  # noqa: E402
from .conv_transpose import ConvTranspose3D  # noqa: E402
from .norms import BatchNorm3D, InstanceNorm3D  # noqa: E402
from .padding import (  # noqa: E402
    CircularPad3D,
    ConstantPad3D,
    ReflectionPad3D,
    ReplicationPad3D,
    ZeroPad3D,
)
from .pooling import AvgPool3D, MaxPool3D  # noqa: E402

__all__ += ["AdaptiveAvgPool3D", "AdaptiveMaxPool3D", "AvgPool3D", "BatchNorm3D", "CircularPad3D",
            "ConstantPad3D", "ConvTranspose3D", "Convolution3D", "InstanceNorm3D", "MaxPool3D",
            "ReflectionPad3D", "ReplicationPad3D", "ZeroPad3D"]

# torch.nn's CTC loss, im2col / col2im, bags of embeddings, unpooling and power-norm pooling
from .ctc_loss import CTCLoss  # noqa: E402
from .embedding_bag import EmbeddingBag  # noqa: E402
from .fold import Fold, Unfold  # noqa: E402
from .lp_pooling import LPPool1D, LPPool2D, LPPool3D  # noqa: E402
from .unpooling import MaxUnpool1D, MaxUnpool2D, MaxUnpool3D  # noqa: E402

__all__ += ["CTCLoss", "EmbeddingBag", "Fold", "LPPool1D", "LPPool2D", "LPPool3D", "MaxUnpool1D",
            "MaxUnpool2D", "MaxUnpool3D", "Unfold"]
from .upsampling_2d import UpsamplingBilinear2D, UpsamplingNearest2D  # noqa: E402

__all__ += ["UpsamplingBilinear2D", "UpsamplingNearest2D"]
from .alpha_dropout import AlphaDropout, FeatureAlphaDropout  # noqa: E402
from .channel_modules import ChannelShuffle, Softmax2D  # noqa: E402
from .triplet_distance_loss import TripletMarginWithDistanceLoss  # noqa: E402

__all__ += ["AlphaDropout", "ChannelShuffle", "FeatureAlphaDropout", "Softmax2D",
            "TripletMarginWithDistanceLoss"]
