"""Char tokenizer ids, round trips and the reverse complement on token tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer, build_tokenizer, load_tokenizer
from nucleo.core import alphabet
from nucleo.core.alphabet import reverse_complement, reverse_complement_bytes
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


def test_compact_ids_are_the_same_ids_in_uint8():
    (record,) = read_sequences(sample_file("viral/lambda.fasta.gz"))
    tok = CharTokenizer()
    compact = tok.encode_compact(bytes(record.seq) + b"acgtRN")
    assert compact.dtype == np.uint8
    assert np.array_equal(compact, tok.encode(bytes(record.seq) + b"acgtRN"))


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


# ----------------------------------------------------------------------------- kmer


def _kmer_reference(seq: str, k: int) -> list[str]:
    """Nucleotide-Transformer tokens, one at a time: k-mers from the start of each run of
    A/C/G/T, leftovers as single bases, each N alone."""
    out: list[str] = []
    for run in seq.replace("N", " N ").split(" "):
        if run == "N":
            out.append("N")
            continue
        whole = len(run) // k * k
        out += [run[i : i + k] for i in range(0, whole, k)] + list(run[whole:])
    return out


def test_kmer_tokens_by_hand_and_against_the_reference():
    tok = build_tokenizer("kmer", {"k": 3})
    ids = tok.encode("ACGNNACGTTA")  # ACG N N ACG TTA
    assert [tok.vocab[i] for i in ids] == ["ACG", "N", "N", "ACG", "TTA"]
    assert tok.vocab[:9] == CharTokenizer.vocab and tok.vocab_size == 9 + 64
    assert ids[0] == 9 + 0 * 16 + 1 * 4 + 2  # base-4, first base most significant
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 6):
        tok = build_tokenizer("kmer", {"k": k})
        for _ in range(20):
            seq = "".join(
                rng.choice(list("ACGTN"), p=[0.23] * 4 + [0.08], size=rng.integers(0, 60))
            )
            assert [tok.vocab[i] for i in tok.encode(seq)] == _kmer_reference(seq, k), seq


def test_kmer_round_trip_bases_per_token_and_reverse_complement_on_a_real_genome():
    tok = build_tokenizer("kmer", {"k": 6})
    rec = next(read_sequences(sample_file("viral/lambda.fasta.gz")))
    seq = bytes(rec.seq)[:20_000] + b"NNNNN" + bytes(rec.seq)[20_000:20_103]  # N run, leftover
    ids = tok.encode(seq)
    assert tok.decode(ids) == seq.decode()
    assert tok.bases_per_token[ids].sum() == len(seq)
    assert len(ids) == 20_000 // 6 + 2 + 5 + 103 // 6 + 103 % 6
    complement = torch.tensor(tok.complement_ids)
    rc = reverse_complement(torch.from_numpy(ids), complement, None)
    assert tok.decode(rc.numpy()) == reverse_complement_bytes(seq).decode()
    assert torch.equal(reverse_complement(rc, complement, None), torch.from_numpy(ids))


def test_kmer_options_are_checked_saved_and_loaded(tmp_path):
    from nucleo.core.schema import ConfigError
    from nucleo.train.config import load_config

    cfg = load_config(overrides=["data.tokenizer=kmer", "data.tokenizer_options.k=4"])
    tok = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_options)
    assert tok.k == 4 and tok.vocab_size == 9 + 256
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.k == 4 and again.vocab == tok.vocab
    for bad, key in (("k=0", "data.tokenizer_options.k"), ("kk=3", "data.tokenizer_options.kk")):
        with pytest.raises(ConfigError) as info:
            load_config(overrides=["data.tokenizer=kmer", f"data.tokenizer_options.{bad}"])
        assert info.value.key == key


def test_geometric_losses_need_one_token_per_base():
    from losses.cgr import ChaosGame, ChaosGameConfig
    from nucleo.core.schema import ConfigError

    with pytest.raises(ConfigError, match=r"data.tokenizer: loss 'cgr' needs one token per base"):
        ChaosGame(ChaosGameConfig(), build_tokenizer("kmer"))


def _bpe(path):
    return build_tokenizer("bpe", {"path": str(path)})


def test_bpe_keeps_char_ids_round_trips_and_counts_bases(sample_bpe):
    tok = _bpe(sample_bpe)
    assert tok.vocab_size == 256 and tok.vocab[:9] == alphabet.VOCAB
    record = next(read_sequences(sample_file("viral/lambda.fasta.gz")))
    seq = bytes(record.seq[:20000])
    ids = tok.encode(seq)
    assert tok.decode(ids) == seq.decode()
    # learned tokens are longer than one base: fewer tokens than bases, bits per base add up
    assert len(ids) < 0.6 * len(seq)
    assert tok.bases_per_token[ids].sum() == len(seq)
    assert tok.max_bases_per_token == max(len(t) for t in tok.vocab[9:])
    assert all(set(t) <= set("ACGT") for t in tok.vocab[9:])  # N is never merged
    ids = tok.encode(b"ACGTNNNACGT")
    assert list(ids[ids == alphabet.N]) == [alphabet.N] * 3
    assert tok.decode(ids) == "ACGTNNNACGT"
    # lower case and IUPAC codes read as the char tokenizer reads them
    assert tok.decode(tok.encode(b"acgtRY")) == "ACGTNN"
    assert tok.complement_ids is None  # no complement map: the rc loss and caduceus refuse it


def test_bpe_is_saved_whole_and_loads_without_its_training_file(sample_bpe, tmp_path):
    tok = _bpe(sample_bpe)
    export = tmp_path / "export"
    export.mkdir()
    tok.save(export)
    moved = tmp_path / "moved.json"
    sample_bpe.rename(moved)  # the export must not depend on the original file
    try:
        loaded = load_tokenizer(export)
        assert loaded.vocab == tok.vocab
        seq = b"ACGTTGCAAGGCTTAGCNNACGTACGATCGATCGGGCTA" * 20
        assert np.array_equal(loaded.encode(seq), tok.encode(seq))
        assert loaded.bases_for(100) == tok.bases_for(100) > 100 * tok.mean_bases_per_token
    finally:
        moved.rename(sample_bpe)


def test_bpe_errors_name_the_problem(tmp_path, sample_shards):
    from data_pipeline.tokenizers import train_bpe
    from nucleo.core.schema import ConfigError

    with pytest.raises(ConfigError, match=r"data\.tokenizer_options\.path"):
        build_tokenizer("bpe", {})
    with pytest.raises(FileNotFoundError, match="nucleo data bpe"):
        build_tokenizer("bpe", {"path": str(tmp_path / "nope.json")})
    bad = tmp_path / "char.json"
    CharTokenizer().save(tmp_path)
    (tmp_path / "nucleo_tokenizer.json").rename(bad)
    with pytest.raises(ValueError, match="not a nucleo BPE"):
        build_tokenizer("bpe", {"path": str(bad)})
    with pytest.raises(ValueError, match="vocab-size"):
        train_bpe(sample_shards, tmp_path / "x.json", vocab_size=8)


def test_rc_loss_and_caduceus_refuse_bpe_clearly(sample_bpe):
    from nucleo.core.schema import ConfigError
    from nucleo.train.components import build_model
    from nucleo.train.config import load_config
    from nucleo.train.objective import Objective

    tok = _bpe(sample_bpe)
    cfg = load_config(arch="caduceus", overrides=["model.d_model=16", "model.n_layers=1"])
    with pytest.raises(ConfigError, match="complement"):
        build_model("caduceus", cfg.model, tok)
    cfg = load_config(arch="transformer", losses="ce,rc", overrides=["model.d_model=16"])
    model = build_model("transformer", cfg.model, tok)
    with pytest.raises(ConfigError, match="complement"):
        Objective.build(cfg.losses, cfg.loss, model, tok)
