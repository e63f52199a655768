"""Char tokenizer ids, round trips and the reverse complement on token tensors."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer, build_tokenizer, load_tokenizer
from nucleo import alphabet
from nucleo.alphabet import reverse_complement, reverse_complement_bytes
from tests.conftest import sample_file


def test_documented_ids():
    tok = CharTokenizer()
    assert tok.vocab == ("A", "C", "G", "T", "N", "<pad>", "<mask>", "<bos>", "<eos>")
    assert list(tok.encode("ACGTN")) == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id) == (5, 6, 7, 8)
    assert tok.vocab_size == 9


def test_round_trip_on_a_real_genome():
    tok = CharTokenizer()
    rec = next(read_sequences(sample_file("viral/lambda.fasta.gz")))
    ids = tok.encode(bytes(rec.seq))
    assert ids.dtype == np.int64 and len(ids) == len(rec)
    assert tok.decode(ids) == bytes(rec.seq).decode()


def test_specials_are_dropped_when_decoding():
    tok = CharTokenizer()
    assert tok.decode([tok.bos_id, 0, 1, tok.pad_id, tok.pad_id]) == "AC"


def test_rc_of_rc_is_identity_on_real_windows():
    tok = CharTokenizer()
    rec = next(read_sequences(sample_file("plasmid/NC_005816.gb.gz")))
    tokens = torch.from_numpy(tok.encode(bytes(rec.seq[:4096]))).view(8, 512)
    assert torch.equal(reverse_complement(reverse_complement(tokens)), tokens)
    assert not torch.equal(reverse_complement(tokens), tokens)


def test_rc_matches_the_byte_level_reverse_complement():
    tok = CharTokenizer()
    seq = b"AACGTNGGCT"
    expected = tok.encode(reverse_complement_bytes(seq))
    got = reverse_complement(torch.from_numpy(tok.encode(seq)))
    assert got.tolist() == expected.tolist()
    assert reverse_complement_bytes(b"ACGTN") == b"NACGT"


def test_rc_keeps_padding_at_the_end():
    tok = CharTokenizer()
    row = torch.tensor([[0, 0, 1, 4, tok.pad_id, tok.pad_id]])  # A A C N <pad> <pad>
    rc = reverse_complement(row)
    assert rc.tolist() == [[4, 2, 3, 3, tok.pad_id, tok.pad_id]]  # N G T T <pad> <pad>
    assert torch.equal(reverse_complement(rc), row)


def test_complement_table_is_an_involution():
    comp = torch.tensor(alphabet.COMPLEMENT_IDS)
    assert torch.equal(comp[comp], torch.arange(len(alphabet.VOCAB)))


def test_save_and_load(tmp_path):
    tok = build_tokenizer("char")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.vocab == tok.vocab
