"""Per-modality tokenizers: one 30-s epoch of one modality → one ``width``-dim token.

Two kinds, chosen by ``ModelConfig.tokenizer``:

``conv`` (:class:`ConvTokenizer`)
    The project's strided stem written as matrix multiplies: a patch layer
    (kernel = stride = 8 samples) is a reshape + ``Linear``; each strided layer
    (kernel 8, stride 4, padding 2) is one ``Linear`` over blocks of 4 time
    steps (see :class:`StridedConv`); the flattened feature map is linearly
    mapped to ``width`` and layer-normalised. It computes exactly what the
    format-1 ``nn.Conv1d`` stem computed (``s2v_core.legacy`` converts those
    weights), but as GEMMs: cuDNN's weight-gradient kernel for a 1-input-channel
    convolution took half of a GPU step, and the CPU spends less time too.
``mlp`` (:class:`MLPTokenizer`)
    The authors' tokenizer: ``Linear(S→2d) → SiLU → Linear(2d→d) → Dropout``
    plus a residual ``Linear(S→d)``, then ``LayerNorm``.

Both take ``(n, E, samples_per_epoch)`` and return ``(n, E, width)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

#: First stem layer: non-overlapping patches of 8 samples (62.5 ms at 128 Hz,
#: 0.5 s at 16 Hz, 2 s at 4 Hz), a linear map that cuts the activation volume
#: of the following layers eightfold.
STEM_PATCH = 8
#: Then strided layers (kernel 8, stride 4, padding 2) until an epoch is at most
#: 32 steps long: 3840 samples → 480 → 120 → 30, 480 → 60 → 15, 120 → 15.
STEM_MAX_STEPS = 32
STEM_STRIDE = 4
STEM_KERNEL = 8
STEM_PADDING = 2


def stem_steps(samples_per_epoch: int) -> list[int]:
    """Time steps after each stem layer (patch layer first) for one epoch of ``samples_per_epoch``."""
    if samples_per_epoch % STEM_PATCH:
        raise ValueError(
            f"tokenizer: samples_per_epoch {samples_per_epoch} is not a multiple of the patch length {STEM_PATCH}"
        )
    steps = [samples_per_epoch // STEM_PATCH]
    while steps[-1] > STEM_MAX_STEPS:
        # padding 2 with kernel 8 / stride 4 gives exactly ceil(steps / 4) outputs.
        steps.append((steps[-1] + 2 * STEM_PADDING - STEM_KERNEL) // STEM_STRIDE + 1)
    return steps


class StridedConv(nn.Module):
    """``Conv1d(C, C, kernel 8, stride 4, padding 2)`` on channel-last input, as one GEMM.

    Output step ``l`` reads padded steps ``4l … 4l+7``, i.e. two consecutive
    non-overlapping blocks of 4 steps. A reshape of the padded input into such
    blocks is free (no im2col copy); one ``Linear(4C → 2C)`` maps every block to
    its contribution as the first half of a window (rows ``:C``) and as the
    second half (rows ``C:``), and output ``l`` adds block ``l``'s first-half
    part to block ``l+1``'s second-half part.

    ``weight`` ``(2C, 4C)``: row ``h*C + o``, column ``k*C + i`` holds the
    convolution weight ``w[o, i, 4h + k]``. Input and output ``(R, L, C)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = STEM_KERNEL // 2
        self.channels = channels
        self.blocks = nn.Linear(half * channels, 2 * channels, bias=False)
        self.bias = nn.Parameter(self.blocks.weight.new_zeros(channels))
        # nn.Conv1d's default initialisation (fan-in = C * kernel).
        bound = (channels * STEM_KERNEL) ** -0.5
        nn.init.uniform_(self.blocks.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        rows, steps, channels = x.shape
        out_steps = (steps + 2 * STEM_PADDING - STEM_KERNEL) // STEM_STRIDE + 1
        blocks = out_steps + 1
        # Pad 2 steps in front and enough behind to fill whole blocks of 4.
        padded = F.pad(x, (0, 0, STEM_PADDING, STEM_STRIDE * blocks - steps - STEM_PADDING))
        parts = self.blocks(padded.reshape(rows, blocks, STEM_STRIDE * channels))  # (R, L+1, 2C)
        return parts[:, :-1, :channels] + parts[:, 1:, channels:] + self.bias


class ConvTokenizer(nn.Module):
    """The strided stem as GEMMs (see the module docstring).

    Parameters
    ----------
    samples_per_epoch : int
        Samples of one 30-s epoch at the store rate (3840 at 128 Hz, 480 at
        16 Hz, 120 at 4 Hz); a multiple of 8.
    width : int
        Token width ``d``.
    channels : int
        Channels of the stem (``ModelConfig.stem_channels``).
    """

    def __init__(self, samples_per_epoch: int, width: int, channels: int) -> None:
        super().__init__()
        steps = stem_steps(samples_per_epoch)
        self.samples_per_epoch = samples_per_epoch
        self.channels = channels
        self.patch = nn.Linear(STEM_PATCH, channels)
        self.strided = nn.ModuleList(StridedConv(channels) for _ in steps[1:])
        # Channel-last flattening: feature (step l, channel c) sits at l * C + c.
        self.out = nn.Linear(steps[-1] * channels, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        n, epochs, samples = x.shape
        # No per-epoch normalisation in the stem: the store already scales each
        # recording to unit robust spread, and the amplitude of an epoch relative to
        # its night (slow waves in N3, a desaturation) is signal that a per-epoch
        # norm on the feature map would erase.
        h = F.gelu(self.patch(x.reshape(n * epochs, samples // STEM_PATCH, STEM_PATCH)))
        for layer in self.strided:
            h = F.gelu(layer(h))
        tokens = self.norm(self.out(h.flatten(1)))
        return tokens.reshape(n, epochs, tokens.shape[-1])  # explicit width: n may be 0


class MLPTokenizer(nn.Module):
    """The authors' tokenizer: ``Linear(S→2d) → SiLU → Linear(2d→d) → Dropout`` + ``Linear(S→d)``, LayerNorm.

    Parameters
    ----------
    samples_per_epoch : int
        Samples of one 30-s epoch at the store rate (``S``).
    width : int
        Token width ``d``.
    dropout : float
        Dropout on the non-residual branch (the authors use 0.1).
    """

    def __init__(self, samples_per_epoch: int, width: int, dropout: float) -> None:
        super().__init__()
        self.samples_per_epoch = samples_per_epoch
        self.hidden = nn.Linear(samples_per_epoch, 2 * width)
        self.output = nn.Linear(2 * width, width)
        self.residual = nn.Linear(samples_per_epoch, width)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.dropout(self.output(F.silu(self.hidden(x))))
        return self.norm(branch + self.residual(x))


#: ``ModelConfig.tokenizer`` → builder ``(samples_per_epoch, config) -> module``.
TOKENIZERS = {
    "conv": lambda samples, config: ConvTokenizer(samples, config.width, config.stem_channels),
    "mlp": lambda samples, config: MLPTokenizer(samples, config.width, config.dropout),
}


def build_tokenizer(kind: str, samples_per_epoch: int, config) -> nn.Module:
    """The tokenizer ``kind`` (a key of :data:`TOKENIZERS`) for one modality."""
    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer: expected one of {', '.join(TOKENIZERS)}, found {kind!r}")
    return TOKENIZERS[kind](samples_per_epoch, config)
