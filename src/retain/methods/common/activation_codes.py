"""2-bit codes of a model's activations against two thresholds, and the margin loss that keeps
activations on the recorded side of them (GeRe's threshold-margin loss).

Each (token, dimension) entry keeps which side of neg and pos the reference activation lay on
(bit 0: <= neg, bit 1: >= pos), four codes per byte: 16x smaller than fp32 activations.
"""

from __future__ import annotations

import torch

LOW, HIGH = 1, 2  # code bits: h0 <= neg, h0 >= pos (both when sigma = 0); 0: strictly inside the band
_SHIFTS = (0, 2, 4, 6)


def threshold_codes(hidden: torch.Tensor, neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """uint8 codes of [..., H] states: bit 0 set where hidden <= neg, bit 1 where hidden >= pos."""
    return (hidden <= neg).to(torch.uint8) * LOW | (hidden >= pos).to(torch.uint8) * HIGH


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[T, H] 2-bit codes -> [T, ceil(H/4)] uint8, four codes per byte."""
    pad = (-codes.shape[-1]) % 4
    codes = torch.nn.functional.pad(codes, (0, pad)).reshape(*codes.shape[:-1], -1, 4)
    packed = torch.zeros(codes.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i, shift in enumerate(_SHIFTS):
        packed |= codes[..., i] << shift
    return packed


def unpack_codes(packed: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Inverse of pack_codes: [..., ceil(H/4)] uint8 -> [..., H] codes."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(*packed.shape[:-1], -1)[..., :hidden_size]


def margin_loss(
    hidden: torch.Tensor, codes: torch.Tensor, neg: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The threshold-margin loss: the mean over violating entries of how far `hidden` crossed a threshold
    on the wrong side of where the base model was (codes), over the tokens of `mask`."""
    hidden = hidden.float()
    low = (codes & LOW).bool()
    high = (codes & HIGH).bool()
    inside = codes == 0
    above, below = torch.relu(hidden - pos), torch.relu(neg - hidden)
    loss = (
        low * torch.relu(hidden - neg) + high * torch.relu(pos - hidden) + inside * (above + below)
    ) * mask.unsqueeze(-1)
    return loss.sum() / ((loss != 0).sum() + 1e-8)
