"""Geometric and topological pictures of DNA, for losses (soft, differentiable) and for
evaluation (distances between sets of sequences): chaos-game representation, frequency CGR,
the 2-D DNA walk, persistence diagrams, k-mer spectra and GC content.

Foundation module: imports only ``nucleo.core.alphabet`` (and numpy, torch, gudhi, scipy).

Conventions: base ids 0..3 are A, C, G, T (``nucleo.core.alphabet``); ``probs`` are per-position
distributions over the four bases [..., L, 4]; ``valid`` [..., L] bool marks the positions
that hold one of A, C, G, T (N, padding and special tokens are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from nucleo.core.alphabet import BASES

# ----------------------------------------------------------------------------- CGR

_S3 = 1 / math.sqrt(3)
#: Corners of the chaos game, per base (rows A, C, G, T).
CORNERS: dict[str, torch.Tensor] = {
    # Regular tetrahedron (3-D): affinely independent, so every distribution over the bases
    # has its own expected corner, and all bases are equally far apart. Complementing a base
    # (A<->T, C<->G) mirrors x and y and keeps z. The default.
    "tetrahedron": torch.tensor(
        [[_S3, _S3, _S3], [_S3, -_S3, -_S3], [-_S3, _S3, -_S3], [-_S3, -_S3, _S3]]
    ),
    # Jeffrey (1990)'s unit square (2-D): the classic picture, but affinely dependent: the
    # uniform prediction and an even A/G mix have the same expected corner (0.5, 0.5).
    "square": torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
    # One-hot (4-D): independent too, one more dimension than needed.
    "onehot": torch.eye(4),
}


def corners(name: str, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[4, dim] corner of each base; ``name`` one of CORNERS."""
    if name not in CORNERS:
        raise ValueError(f"unknown CGR corners {name!r}; choose one of {', '.join(CORNERS)}")
    return CORNERS[name].to(dtype=dtype, device=device)


def base_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[..., L] bool: the positions holding A, C, G or T (ids 0..3)."""
    return (tokens >= 0) & (tokens < 4)


def cgr_points(
    weights: torch.Tensor, valid: torch.Tensor, corner: torch.Tensor, chunk: int = 32
) -> torch.Tensor:
    """Chaos-game trajectory: x_0 = centre, x_t = (x_{t-1} + c_t) / 2, c_t = weights_t @ corner.

    weights: [..., L, 4] one-hot bases or predicted distributions (the expected corner makes
    the trajectory differentiable); valid: [..., L] (invalid positions repeat the previous
    point); corner: [4, dim]. Returns [..., L, dim] in corner's dtype.

    With d = x - centre and n_t the number of valid positions up to t, D_t = 2^n_t d_t is a
    plain prefix sum, D_t = D_0 + sum_{j<=t valid} 2^(n_j - 1) (c_j - centre); it is taken
    within chunks of ``chunk`` positions (2^32 at most: no overflow) and carried across
    chunks, so the loop runs L / chunk times, not L.
    """
    centre = corner.mean(0)
    step = (weights.to(corner.dtype) @ corner - centre) * valid[..., None]  # [..., L, dim]
    length = step.shape[-2]
    carry = torch.zeros_like(step[..., 0, :])  # d at the end of the previous chunk
    out = []
    for start in range(0, length, chunk):
        s = step[..., start : start + chunk, :]
        n = torch.cumsum(valid[..., start : start + chunk].to(s.dtype), dim=-1)[..., None]
        total = carry[..., None, :] + torch.cumsum(torch.exp2(n - 1) * s, dim=-2)
        d = total * torch.exp2(-n)
        out.append(d)
        carry = d[..., -1, :]
    return torch.cat(out, dim=-2) + centre


def cgr_reference(weights: torch.Tensor, valid: torch.Tensor, corner: torch.Tensor) -> torch.Tensor:
    """The chaos game, one position at a time (the readable reference of ``cgr_points``)."""
    point = corner.mean(0).expand(*weights.shape[:-2], corner.shape[1])
    out = []
    for t in range(weights.shape[-2]):
        moved = (point + weights[..., t, :].to(corner.dtype) @ corner) / 2
        point = torch.where(valid[..., t, None], moved, point)
        out.append(point)
    return torch.stack(out, dim=-2)


def kmer_index(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (base-4, first base most significant) of the k-mer ending at each position.

    tokens: [..., L]. Returns index [..., L] int64 and ok [..., L] bool (the k bases ending
    there are all A/C/G/T; false for the first k-1 positions).
    """
    valid = base_mask(tokens)
    codes = tokens.clamp(0, 3)
    index = torch.zeros_like(codes)
    ok = torch.ones_like(valid)
    length = tokens.shape[-1]
    for j in range(k):  # base at t - (k-1-j) contributes 4^(k-1-j)
        shift = k - 1 - j
        part = torch.zeros_like(codes)
        good = torch.zeros_like(valid)
        if shift < length:
            part[..., shift:] = codes[..., : length - shift]
            good[..., shift:] = valid[..., : length - shift]
        index = index * 4 + part
        ok = ok & good
    return index, ok


def kmer_spectrum(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """[..., 4^k] counts of the k-mers (over A/C/G/T only) of each sequence."""
    index, ok = kmer_index(tokens, k)
    flat_index = index.reshape(-1, index.shape[-1])
    flat_ok = ok.reshape(-1, ok.shape[-1]).to(torch.float64)
    counts = torch.zeros(flat_index.shape[0], 4**k, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, flat_index, flat_ok)
    return counts.reshape(*tokens.shape[:-1], 4**k)


def fcgr_layout(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each k-mer's cell in the 2^k x 2^k frequency-CGR image (square corners:
    A bottom-left, C top-left, G top-right, T bottom-right; the last base picks the quadrant
    at the finest scale, as the chaos game does)."""
    codes = np.arange(4**k)
    row = np.zeros(4**k, dtype=np.int64)
    col = np.zeros(4**k, dtype=np.int64)
    for j in range(k):  # j = 0: the first base, the coarsest scale
        base = (codes // 4 ** (k - 1 - j)) % 4
        x = np.isin(base, (2, 3)).astype(np.int64)  # G, T on the right
        y = np.isin(base, (1, 2)).astype(np.int64)  # C, G on top
        col += x << j
        row += (1 - y) << j  # image rows grow downwards
    return row, col


def fcgr_image(spectrum: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """[2^k, 2^k] frequency-CGR image of a k-mer spectrum [4^k] (normalised to sum 1)."""
    values = np.asarray(spectrum, dtype=np.float64).reshape(-1)
    row, col = fcgr_layout(k)
    image = np.zeros((2**k, 2**k))
    image[row, col] = values / max(values.sum(), 1e-300)
    return image


# ----------------------------------------------------------------------------- DNA walk

#: Yau et al. (2003), "DNA sequence representation without degeneracy": unit vectors with the
#: purines (A, G) below the x-axis and the pyrimidines (C, T) above; rows A, C, G, T.
WALK_VECTORS = torch.tensor(
    [
        [0.5, -math.sqrt(3) / 2],
        [math.sqrt(3) / 2, 0.5],
        [math.sqrt(3) / 2, -0.5],
        [0.5, math.sqrt(3) / 2],
    ]
)


def dna_walk(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[..., L, 2] walk: cumulative sum of the (expected) Yau vector of each valid position.

    weights: [..., L, 4] one-hot bases or predicted distributions; valid: [..., L].
    """
    vectors = WALK_VECTORS.to(dtype=weights.dtype, device=weights.device)
    return torch.cumsum((weights @ vectors) * valid[..., None], dim=-2)


# ----------------------------------------------------------------------------- persistence


def persistence_pairs(distances: torch.Tensor, max_dimension: int = 1) -> list[torch.Tensor]:
    """Differentiable finite persistence pairs of the Vietoris-Rips filtration.

    distances: [n, n] symmetric, with grad. The pairing comes from gudhi on a detached copy
    (``flag_persistence_generators``: the vertex and the edges that create and kill each
    class); births and deaths are gathered from ``distances`` itself, so gradients flow to
    every point involved. Returns one [m_d, 2] (birth, death) tensor per dimension
    0..max_dimension. Infinite classes (the one component that never dies) are left out.
    """
    import gudhi

    matrix = distances.detach().double().cpu().numpy()
    rips = gudhi.RipsComplex(distance_matrix=matrix)
    tree = rips.create_simplex_tree(max_dimension=max_dimension + 1)
    tree.compute_persistence()
    regular0, regular_higher, _, _ = tree.flag_persistence_generators()
    out = []
    if len(regular0):
        idx = torch.as_tensor(np.asarray(regular0, dtype=np.int64), device=distances.device)
        death = distances[idx[:, 1], idx[:, 2]]
        out.append(torch.stack([torch.zeros_like(death), death], dim=-1))
    else:
        out.append(distances.new_zeros(0, 2))
    for dim in range(1, max_dimension + 1):
        gens = regular_higher[dim - 1] if dim - 1 < len(regular_higher) else np.zeros((0, 4))
        idx = torch.as_tensor(np.asarray(gens, dtype=np.int64), device=distances.device)
        if idx.numel() == 0:
            out.append(distances.new_zeros(0, 2))
            continue
        birth = distances[idx[:, 0], idx[:, 1]]
        death = distances[idx[:, 2], idx[:, 3]]
        out.append(torch.stack([birth, death], dim=-1))
    return out


def wasserstein(a: torch.Tensor, b: torch.Tensor, order: float = 1.0) -> torch.Tensor:
    """Wasserstein distance between persistence diagrams a [n, 2] and b [m, 2].

    Ground metric L-infinity (gudhi's default); a point may also be matched to the diagonal at
    cost (death - birth) / 2. The optimal matching is found on detached values (Hungarian
    algorithm, scipy) and the cost is summed in torch, so gradients reach both diagrams.
    Returns (sum of matched costs^order)^(1/order), a scalar.
    """
    from scipy.optimize import linear_sum_assignment

    n, m = len(a), len(b)
    if n == 0 and m == 0:
        return (a.sum() + b.sum()) * 0.0
    pair = (a[:, None, :] - b[None, :, :]).abs().amax(-1) ** order  # [n, m]
    to_diag_a = ((a[:, 1] - a[:, 0]) / 2).abs() ** order  # [n]
    to_diag_b = ((b[:, 1] - b[:, 0]) / 2).abs() ** order  # [m]
    # (n + m) x (m + n): real-real, real-diagonal, diagonal-real, diagonal-diagonal (free)
    big = torch.zeros(n + m, m + n, dtype=pair.dtype, device=pair.device)
    inf = torch.finfo(pair.dtype).max / 4
    big[:n, :m] = pair
    big[:n, m:] = inf
    big[:n, m:][torch.arange(n), torch.arange(n)] = to_diag_a
    big[n:, :m] = inf
    big[n:, :m][torch.arange(m), torch.arange(m)] = to_diag_b
    rows, cols = linear_sum_assignment(big.detach().double().cpu().numpy())
    rows_t = torch.as_tensor(rows, device=pair.device)
    cols_t = torch.as_tensor(cols, device=pair.device)
    cost = big[rows_t, cols_t].sum()
    return cost ** (1.0 / order)


def diagrams(points: torch.Tensor, max_dimension: int = 1) -> list[torch.Tensor]:
    """Rips persistence diagrams (H0 .. H_max_dimension) of a point cloud [n, dim]."""
    return persistence_pairs(torch.cdist(points, points), max_dimension)


# ----------------------------------------------------------------------------- set distances


def gc_content(tokens: torch.Tensor) -> torch.Tensor:
    """[...] fraction of G or C among the A/C/G/T positions of each sequence (nan if none)."""
    valid = base_mask(tokens)
    gc = ((tokens == 1) | (tokens == 2)) & valid
    return gc.sum(-1).double() / valid.sum(-1).double()


def kmer_divergence(a: torch.Tensor, b: torch.Tensor, k: int = 4) -> float:
    """Jensen-Shannon divergence (bits, 0..1) between the pooled k-mer spectra of two sets of
    sequences (token tensors [n, L] and [m, L'])."""
    p = kmer_spectrum(a, k).reshape(-1, 4**k).sum(0)
    q = kmer_spectrum(b, k).reshape(-1, 4**k).sum(0)
    p, q = p / p.sum().clamp_min(1e-300), q / q.sum().clamp_min(1e-300)
    mid = (p + q) / 2

    def kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        keep = x > 0
        return (x[keep] * (x[keep] / y[keep]).log2()).sum()

    return float((kl(p, mid) + kl(q, mid)) / 2)


def onehot(tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., L, 4] one-hot of the bases (zeros at non-ACGT positions)."""
    valid = base_mask(tokens)
    out = torch.nn.functional.one_hot(tokens.clamp(0, 3), 4).to(dtype)
    return out * valid[..., None]


def topology_distance(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    points: int = 128,
    corner: str = "tetrahedron",
) -> float:
    """Mean Wasserstein distance (H0 + H1) between the CGR persistence diagrams of two sets of
    sequences, paired in order (each a [L] token tensor; subsampled to ``points`` points)."""
    total = 0.0
    pairs = list(zip(a, b, strict=False))
    c = corners(corner, torch.float64)
    for x, y in pairs:
        dx = _cgr_cloud(x, c, points)
        dy = _cgr_cloud(y, c, points)
        for da, db in zip(diagrams(dx), diagrams(dy), strict=True):
            total += float(wasserstein(da, db))
    return total / max(len(pairs), 1)


def _cgr_cloud(tokens: torch.Tensor, corner: torch.Tensor, points: int) -> torch.Tensor:
    valid = base_mask(tokens)
    traj = cgr_points(onehot(tokens, corner.dtype), valid, corner)[valid]
    stride = max(1, len(traj) // points)
    return traj[::stride][:points]


__all__ = [
    "BASES",
    "CORNERS",
    "WALK_VECTORS",
    "base_mask",
    "cgr_points",
    "cgr_reference",
    "corners",
    "diagrams",
    "dna_walk",
    "fcgr_image",
    "fcgr_layout",
    "gc_content",
    "kmer_divergence",
    "kmer_index",
    "kmer_spectrum",
    "onehot",
    "persistence_pairs",
    "topology_distance",
    "wasserstein",
]
