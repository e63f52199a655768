"""The DNA alphabet and its token ids, shared by tokenizers, models and losses.

Foundation module: imports nothing from the project.

Token ids of the character vocabulary (``VOCAB``)::

    0 A   1 C   2 G   3 T   4 N   5 <pad>   6 <mask>   7 <bos>   8 <eos>

The four bases come first so that a base's id is its index into per-base tables (one-hot, CGR
corners) and the complement of a base id ``b < 4`` is ``3 - b``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are used: shard-building workers need none
    import torch

BASES = "ACGT"
VOCAB: tuple[str, ...] = ("A", "C", "G", "T", "N", "<pad>", "<mask>", "<bos>", "<eos>")
A, C, G, T, N, PAD, MASK, BOS, EOS = range(len(VOCAB))
SPECIAL_TOKENS = ("<pad>", "<mask>", "<bos>", "<eos>")

#: Complement of every id of ``VOCAB`` (specials and N map to themselves).
COMPLEMENT_IDS: tuple[int, ...] = (T, G, C, A, N, PAD, MASK, BOS, EOS)

#: Byte-level complement of normalised sequences (upper-case ACGTN).
COMPLEMENT_BYTES = bytes.maketrans(b"ACGTNacgtn", b"TGCANtgcan")


def reverse_complement_bytes(seq: bytes | bytearray) -> bytes:
    """Reverse complement of an upper- or lower-case ACGTN byte string."""
    return bytes(seq).translate(COMPLEMENT_BYTES)[::-1]


def reverse_complement(
    tokens: torch.Tensor,
    complement: torch.Tensor | None = None,
    pad_id: int | None = PAD,
) -> torch.Tensor:
    """Reverse complement of token ids along the last dimension.

    tokens: [..., L] int64. complement: [V] int64 permutation of the vocabulary (default: the
    character vocabulary's ``COMPLEMENT_IDS``). Trailing ``pad_id`` tokens stay at the end, so a
    padded window's bases are reversed among themselves: rc(rc(x)) == x for any x.
    """
    import torch

    if complement is None:
        complement = torch.tensor(COMPLEMENT_IDS, dtype=torch.long, device=tokens.device)
    comp = complement.to(tokens.device)[tokens]
    if pad_id is None:
        return comp.flip(-1)
    length = tokens.shape[-1]
    valid = (tokens != pad_id).sum(-1, keepdim=True)  # [..., 1]; pads are trailing by contract
    pos = torch.arange(length, device=tokens.device)
    src = torch.where(pos < valid, valid - 1 - pos, pos)
    return comp.gather(-1, src.expand_as(comp))
