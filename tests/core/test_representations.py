"""Shared representations: CGR (fast vs reference, and tied to the frequency-CGR layout),
k-mer spectra, GC content, DNA walk, persistence-based and k-mer distances between sets."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.tokenizers import CharTokenizer
from nucleo.core.representations import (
    CORNERS,
    WALK_VECTORS,
    base_mask,
    cgr_points,
    cgr_reference,
    corners,
    dna_walk,
    fcgr_image,
    fcgr_layout,
    gc_content,
    kmer_divergence,
    kmer_spectrum,
    onehot,
    topology_distance,
)

TOKENIZER = CharTokenizer()


def _tokens(text: str) -> torch.Tensor:
    return torch.from_numpy(TOKENIZER.encode(text))


@pytest.mark.parametrize("name", sorted(CORNERS))
def test_closed_form_cgr_equals_the_chaos_game_played_one_step_at_a_time(name):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (3, 301), generator=gen)  # N and padding are skipped
    weights = torch.softmax(torch.randn(3, 301, 4, generator=gen, dtype=torch.float64), -1)
    valid = base_mask(tokens)
    c = corners(name, torch.float64)
    torch.testing.assert_close(cgr_points(weights, valid, c), cgr_reference(weights, valid, c))


def test_square_cgr_points_fall_in_the_cell_of_their_last_k_mer():
    """The chaos game at resolution 2^k places x_t in the cell of the k bases ending at t:
    the frequency-CGR image is the histogram of the CGR points."""
    text = "ACGTTGCAAGCTTAGGCATCGATCGGATCCTAGA"
    tokens = _tokens(text)
    k = 3
    points = cgr_points(onehot(tokens, torch.float64), base_mask(tokens), corners("square"))
    row, col = fcgr_layout(k)
    for t in range(k - 1, len(text)):
        index = 0
        for base in text[t - k + 1 : t + 1]:
            index = index * 4 + "ACGT".index(base)
        x, y = points[t].tolist()
        assert (int(x * 2**k), 2**k - 1 - int(y * 2**k)) == (col[index], row[index])


def test_kmer_spectrum_gc_content_and_the_fcgr_image():
    tokens = _tokens("ACGTANAC")  # 2-mers: AC CG GT TA (N breaks) AC
    spectrum = kmer_spectrum(tokens, 2)
    expected = {"AC": 2, "CG": 1, "GT": 1, "TA": 1}
    for kmer, count in expected.items():
        assert spectrum["ACGT".index(kmer[0]) * 4 + "ACGT".index(kmer[1])] == count
    assert spectrum.sum() == 5
    assert gc_content(_tokens("GGCAN")).item() == pytest.approx(3 / 4)
    image = fcgr_image(spectrum, 2)
    assert image.shape == (4, 4) and image.sum() == pytest.approx(1.0)


def test_tetrahedron_corners_are_equidistant_and_complement_mirrors_them():
    c = corners("tetrahedron", torch.float64)
    d = torch.cdist(c, c)
    off = d[~torch.eye(4, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, off[0].item()))
    mirrored = c[[3, 2, 1, 0]]  # T G C A: the complements
    torch.testing.assert_close(mirrored[:, :2], -c[:, :2])
    torch.testing.assert_close(mirrored[:, 2], c[:, 2])


def test_dna_walk_by_hand():
    tokens = _tokens("ATNG")
    walk = dna_walk(onehot(tokens), base_mask(tokens))
    a, t, g = WALK_VECTORS[0], WALK_VECTORS[3], WALK_VECTORS[2]
    torch.testing.assert_close(walk[-1], a + t + g)
    torch.testing.assert_close(walk[2], walk[1])  # N is not walked
    assert all(abs(v.norm().item() - 1) < 1e-6 for v in WALK_VECTORS)


def test_set_distances():
    gen = torch.Generator().manual_seed(0)
    real = [torch.randint(0, 4, (300,), generator=gen) for _ in range(3)]
    repeats = [_tokens("ACGTTT" * 50) for _ in range(3)]
    assert topology_distance(real, real) == 0.0
    assert topology_distance(real, repeats) > 0.1
    assert kmer_divergence(torch.stack(real), torch.stack(real)) == pytest.approx(0.0)
    all_a, all_c = _tokens("A" * 50)[None], _tokens("C" * 50)[None]
    assert kmer_divergence(all_a, all_c, k=3) == pytest.approx(1.0)  # disjoint: 1 bit
    assert 0 < kmer_divergence(torch.stack(real), torch.stack(repeats)) < 1
    assert math.isnan(gc_content(_tokens("NNN")).item())
