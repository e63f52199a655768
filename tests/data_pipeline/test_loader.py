"""Streaming windows: rank/worker splits, seeded order, exact resume, N filtering, validation."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import (
    BadShardError,
    DataConfig,
    NoWindowsError,
    TrainLoader,
    crop_windows,
    validation_windows,
)
from data_pipeline.readers import read_sequences
from data_pipeline.shards import ShardOptions, SourceFile, build_shards
from data_pipeline.tokenizers import CharTokenizer, build_tokenizer
from nucleo.core.alphabet import reverse_complement
from nucleo.core.schema import ConfigError
from tests.conftest import ROOT, sample_file


def _take(loader: TrainLoader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _loader(shards, rank=0, world=1, workers=0, seed=0, batch=4, seq_len=256) -> TrainLoader:
    cfg = DataConfig(shards=str(shards), seq_len=seq_len, num_workers=workers, shuffle_buffer=64)
    return TrainLoader(cfg, CharTokenizer(), batch, seed, rank, world)


def test_two_ranks_by_two_workers_read_disjoint_shards(four_kingdom_shards):
    # One shard per kingdom: the kingdom of a window names the shard it was read from.
    seen = {}
    for rank in (0, 1):
        loader = _loader(four_kingdom_shards, rank=rank, world=2, workers=2)
        batches = _take(loader, 8)
        for j, batch in enumerate(batches):  # the DataLoader alternates its two workers
            kingdoms = {loader.kingdoms[k] for k in batch.kingdom.tolist()}
            assert len(kingdoms) == 1, "a worker reads only its own shard"
            seen.setdefault((rank, j % 2), set()).update(kingdoms)
    readers = list(seen.values())
    assert all(len(k) == 1 for k in readers)
    assert set().union(*readers) == {"fungi", "plasmid", "plastid", "viral"}


def test_too_few_shards_for_the_readers_is_a_clear_error(four_kingdom_shards):
    with pytest.raises(ValueError, match="cannot feed 6 readers"):
        _loader(four_kingdom_shards, rank=0, world=3, workers=2)


def test_same_seed_same_batches_other_seed_other_batches(sample_shards):
    a = _take(_loader(sample_shards, seed=7, workers=2), 6)
    b = _take(_loader(sample_shards, seed=7, workers=2), 6)
    c = _take(_loader(sample_shards, seed=8, workers=2), 6)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=False))
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, c, strict=False))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 5), (2, 4), (3, 7)])
def test_resume_gives_exactly_the_next_batches(sample_shards, workers, stop):
    full = _take(_loader(sample_shards, workers=workers), stop + 4)
    first = _loader(sample_shards, workers=workers)
    _take(first, stop)
    state = first.state_dict()
    assert state["consumed"] == stop
    resumed = _loader(sample_shards, workers=workers)
    resumed.load_state_dict(state)
    rest = _take(resumed, 4)
    for expected, got in zip(full[stop:], rest, strict=True):
        assert torch.equal(expected.tokens, got.tokens)
        assert torch.equal(expected.kingdom, got.kingdom)


def test_changed_layout_warns_restarts_and_later_resumes_are_exact(sample_shards):
    first = _loader(sample_shards, workers=0)
    _take(first, 2)
    other = _loader(sample_shards, workers=0, batch=8)
    with pytest.warns(UserWarning, match="layout changed"):
        other.load_state_dict(first.state_dict())
    assert other.consumed == 0
    uninterrupted = _take(other, 5)
    # The new stream, checkpointed after 3 batches, then resumed with the same new layout:
    again = _loader(sample_shards, workers=0, batch=8)
    with pytest.warns(UserWarning):
        again.load_state_dict(first.state_dict())
    _take(again, 3)
    resumed = _loader(sample_shards, workers=0, batch=8)
    resumed.load_state_dict(again.state_dict())
    for expected, got in zip(uninterrupted[3:], _take(resumed, 2), strict=True):
        assert torch.equal(expected.tokens, got.tokens)


def test_batches_carry_tokens_and_kingdoms(sample_shards):
    loader = _loader(sample_shards, batch=8, seq_len=128)
    (batch,) = _take(loader, 1)
    assert batch.tokens.shape == (8, 128) and batch.tokens.dtype == torch.int64
    assert batch.kingdom.shape == (8,)
    assert batch.kingdoms == loader.kingdoms and len(loader.kingdoms) == 10
    assert int(batch.tokens.max()) <= 5  # bases, N and padding only


def test_mostly_n_windows_are_skipped():
    rng = random.Random(0)
    chunk = b"N" * 900 + b"ACGT" * 25  # 100 real bases at the end
    windows = list(crop_windows(chunk, 100, 0.1, rng))
    assert all(w.count(b"N") <= 10 for w in windows)
    assert list(crop_windows(b"N" * 1000, 100, 0.1, rng)) == []
    assert len(list(crop_windows(b"ACGT" * 250, 100, 0.1, rng))) == 10


def test_records_shorter_than_a_window_are_padded_at_the_end(tmp_path):
    out = tmp_path / "short"
    source = SourceFile(sample_file("plasmid/NC_009934.gbk"), "plasmid")  # 2,133 bases
    build_shards([source], out, ShardOptions(min_shards=1, val_fraction=0.0), log=lambda _: None)
    (batch,) = _take(_loader(out, seq_len=4096, batch=2), 1)
    tok = CharTokenizer()
    bases = bytes(next(read_sequences(source.path)).seq).decode()
    for row in batch.tokens:
        assert (row[:2133] != tok.pad_id).all() and (row[2133:] == tok.pad_id).all()
        assert tok.decode(row) == bases


def test_windows_longer_than_chunks_are_refused(four_kingdom_shards):
    with pytest.raises(ValueError, match="chunk-len"):
        _loader(four_kingdom_shards, seq_len=10_000)


def test_unknown_kingdom_is_named(sample_shards):
    cfg = DataConfig(shards=str(sample_shards), kingdoms=["viral", "martian"])
    with pytest.raises(ValueError, match=r"'martian'.*available: archaea"):
        TrainLoader(cfg, CharTokenizer(), 2, 0)


def test_missing_shards_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nucleo data build"):
        TrainLoader(DataConfig(shards=str(tmp_path / "nope")), CharTokenizer(), 2, 0)


def test_validation_windows_are_fixed_and_bounded(sample_shards):
    cfg = DataConfig(shards=str(sample_shards), seq_len=256)
    tokens, kingdom, names = validation_windows(cfg, CharTokenizer(), 8, seed=3)
    again, _, _ = validation_windows(cfg, CharTokenizer(), 8, seed=3)
    assert torch.equal(tokens, again)
    counts = torch.bincount(kingdom, minlength=len(names)).tolist()
    by_name = dict(zip(names, counts, strict=False))
    assert by_name["vertebrate_other"] == 0  # one record: training only
    assert all(c == 8 for n, c in by_name.items() if n != "vertebrate_other")


def test_kmer_windows_cut_enough_bases_for_seq_len_tokens(sample_shards):
    """seq_len counts tokens: a k-mer tokenizer's windows are seq_len x k bases long."""
    tok = build_tokenizer("kmer", {"k": 6})
    cfg = DataConfig(
        shards=str(sample_shards), seq_len=64, tokenizer="kmer", tokenizer_options={"k": 6},
        num_workers=0, shuffle_buffer=64,
    )  # fmt: skip
    (batch,) = _take(TrainLoader(cfg, tok, 8, 0), 1)
    assert batch.tokens.shape == (8, 64)
    filled = (batch.tokens != tok.pad_id).float().mean().item()
    assert filled > 0.9, filled  # not 1/6 of the row: the windows hold 384 bases
    assert int(batch.tokens.max()) >= tok.first  # k-mer ids
    tokens, _, _ = validation_windows(cfg, tok, 2, seed=0)
    assert tokens.shape[1] == 64 and (tokens != tok.pad_id).float().mean() > 0.9


def test_reverse_complement_augmentation(sample_shards):
    """rc_prob=1 gives exactly the reverse complements of the windows rc_prob=0 gives (same
    crops: the coin flips have their own random stream); 0.5 flips about half."""
    plain = _take(_loader(sample_shards, batch=32, seq_len=64), 2)
    cfg = DataConfig(str(sample_shards), seq_len=64, num_workers=0, shuffle_buffer=64, rc_prob=1.0)
    flipped = _take(TrainLoader(cfg, CharTokenizer(), 32, 0), 2)
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(reverse_complement(a.tokens), b.tokens)
        assert torch.equal(a.kingdom, b.kingdom)
    cfg.rc_prob = 0.5
    half = _take(TrainLoader(cfg, CharTokenizer(), 32, 0), 2)
    same = sum(
        torch.equal(x, y)
        for a, h in zip(plain, half, strict=True)
        for x, y in zip(a.tokens, h.tokens, strict=True)
    )
    assert 16 <= same <= 48, same  # of 64 windows


def _kingdom_shares(shards, batches: int, **options) -> dict[str, float]:
    cfg = DataConfig(str(shards), seq_len=256, num_workers=0, shuffle_buffer=64, **options)
    loader = TrainLoader(cfg, CharTokenizer(), 16, 0)
    counts = torch.zeros(len(loader.kingdoms))
    for batch in _take(loader, batches):
        counts += torch.bincount(batch.kingdom, minlength=len(loader.kingdoms))
    return dict(zip(loader.kingdoms, (counts / counts.sum()).tolist(), strict=True))


def test_kingdom_mixtures_natural_uniform_and_temperature(four_kingdom_shards):
    """Four genomes of 48 kb to 230 kb: natural draws follow their sizes, uniform evens them
    out, temperature 0.5 lands in between."""
    natural = _kingdom_shares(four_kingdom_shards, 40)
    uniform = _kingdom_shares(four_kingdom_shards, 40, mixture="uniform")
    tempered = _kingdom_shares(four_kingdom_shards, 40, mixture="temperature", mixture_alpha=0.5)
    assert natural["viral"] < 0.15 and natural["fungi"] > 0.3, natural
    assert all(abs(share - 0.25) < 0.06 for share in uniform.values()), uniform
    assert natural["viral"] < tempered["viral"] < uniform["viral"], (natural, tempered, uniform)
    cfg = DataConfig(str(four_kingdom_shards), mixture="temperature", mixture_alpha=0.5)
    weights = TrainLoader(cfg, CharTokenizer(), 4, 0).mixture()
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["viral"] == pytest.approx(tempered["viral"], abs=0.06)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_is_exact_with_a_mixture(sample_shards):
    def make() -> TrainLoader:
        cfg = DataConfig(str(sample_shards), seq_len=128, num_workers=2, shuffle_buffer=64,
                         mixture="uniform", rc_prob=0.5)  # fmt: skip
        return TrainLoader(cfg, CharTokenizer(), 4, 3)

    full = _take(make(), 9)
    first = make()
    _take(first, 5)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for expected, got in zip(full[5:], _take(resumed, 4), strict=True):
        assert torch.equal(expected.tokens, got.tokens)


def _with_a_corrupt_shard(source, tmp_path) -> tuple[Path, str]:
    """A copy of ``source`` whose first fungi training shard is cut in half."""
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    shard = sorted((out / "fungi").glob("train-*.tar"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 10 + 100])  # a truncated tar: mid-member
    return out, str(shard)


def test_a_corrupt_or_missing_shard_is_named(tmp_path, four_kingdom_shards):
    from data_pipeline.loader import BadShardError, tar_samples

    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 200)
    for path in (tmp_path / "junk.tar", tmp_path / "missing.tar"):
        with pytest.raises(BadShardError, match=f"shard {path} is unreadable"):
            list(tar_samples(str(path)))
    shards, bad = _with_a_corrupt_shard(four_kingdom_shards, tmp_path)
    cfg = DataConfig(str(shards), seq_len=256, num_workers=0, shuffle_buffer=8)
    with pytest.raises(BadShardError, match=re.escape(bad)):
        _take(TrainLoader(cfg, CharTokenizer(), 16, 0), 60)


def test_bad_shards_can_be_skipped_and_are_counted(tmp_path, four_kingdom_shards):
    from data_pipeline.loader import SKIPPED_KEY, SKIPPED_SHARDS

    shards, bad = _with_a_corrupt_shard(four_kingdom_shards, tmp_path)
    cfg = DataConfig(str(shards), seq_len=256, num_workers=0, shuffle_buffer=8,
                     on_bad_shard="skip")  # fmt: skip
    with pytest.warns(UserWarning, match=f"skipping the rest of shard {re.escape(bad)}"):
        batches = _take(TrainLoader(cfg, CharTokenizer(), 16, 0), 60)
    assert bad in SKIPPED_SHARDS
    assert batches[-1].aux[SKIPPED_KEY].tolist() == [0, len(SKIPPED_SHARDS)]
    # the other kingdoms still flow; the corrupt shard (its kingdom's only one) is refused whole
    assert len({int(k) for b in batches for k in b.kingdom}) == 3


def test_seq_len_warmup_stages_by_optimizer_step():
    cfg = DataConfig(seq_len=256, seq_len_warmup=32, seq_len_warmup_steps=12)
    assert cfg.warmup_stages() == [32, 64, 128]
    assert [cfg.seq_len_at(s) for s in range(14)] == [32] * 4 + [64] * 4 + [128] * 4 + [256] * 2
    assert DataConfig(seq_len=256).seq_len_at(0) == 256  # off
    with pytest.raises(ConfigError, match="seq_len_warmup"):
        DataConfig(seq_len=256, seq_len_warmup=256, seq_len_warmup_steps=4)
    with pytest.raises(ConfigError, match="seq_len_warmup_steps"):
        DataConfig(seq_len=256, seq_len_warmup=32)


def _bpe_loader(shards, bpe, workers=2) -> TrainLoader:
    """BPE tokens, a temperature mixture, RC augmentation and a seq-len warm-up, 2 micro-batches
    per step: everything that makes a batch depend on its position in the stream."""
    cfg = DataConfig(
        str(shards), seq_len=128, num_workers=workers, shuffle_buffer=64, tokenizer="bpe",
        tokenizer_options={"path": str(bpe)}, mixture="temperature", mixture_alpha=0.3,
        rc_prob=0.5, seq_len_warmup=32, seq_len_warmup_steps=4,
    )  # fmt: skip
    return TrainLoader(cfg, build_tokenizer("bpe", cfg.tokenizer_options), 4, 7, grad_accum=2)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("stop", [3, 6])
def test_bpe_mixture_rc_warmup_stream_resumes_exactly(sample_shards, sample_bpe, stop):
    full = _take(_bpe_loader(sample_shards, sample_bpe), 12)
    # micro-batch j belongs to step j // 2: 32 tokens for steps 0-1, 64 for 2-3, then 128
    assert [b.tokens.shape[1] for b in full] == [32] * 4 + [64] * 4 + [128] * 4
    pad = build_tokenizer("bpe", {"path": str(sample_bpe)}).pad_id
    assert (full[-1].tokens != pad).float().mean() > 0.95  # the windows cut enough bases
    first = _bpe_loader(sample_shards, sample_bpe)
    _take(first, stop)
    resumed = _bpe_loader(sample_shards, sample_bpe)
    resumed.load_state_dict(first.state_dict())
    for expected, got in zip(full[stop:], _take(resumed, 12 - stop), strict=True):
        assert torch.equal(expected.tokens, got.tokens)
        assert torch.equal(expected.kingdom, got.kingdom)


@pytest.fixture
def all_n_shards(tmp_path):
    genome = tmp_path / "n.fa"
    genome.write_text("".join(f">gap{i}\n{'N' * 6000}\n" for i in range(4)))
    lines: list[str] = []
    out = tmp_path / "shards"
    build_shards([SourceFile(genome, "viral")], out, ShardOptions(min_shards=1, val_fraction=0),
                 log=lines.append)  # fmt: skip
    return out, lines


@pytest.mark.parametrize("mixture,workers", [("natural", 0), ("temperature", 0), ("natural", 1)])
def test_shards_that_give_no_window_stop_with_a_named_error(all_n_shards, mixture, workers):
    """All-N records: the build warns, and the loader raises naming the shards and
    data.max_n_fraction (it used to loop forever, in a worker that outlived its trainer)."""
    shards, build_lines = all_n_shards
    assert any("4 of 4 records are more than 10% N" in line for line in build_lines)
    cfg = DataConfig(shards=str(shards), seq_len=64, mixture=mixture, num_workers=workers)
    loader = TrainLoader(cfg, CharTokenizer(), batch_size=2, seed=0)
    with pytest.raises(NoWindowsError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "viral/train-000000.tar" in message and "data.max_n_fraction=0.1" in message
    assert "Traceback" not in message and "\n" not in message


DIES_WITH_PARENT = """
import multiprocessing as mp, os, sys, time
from data_pipeline.loader import die_with_parent

def child(parent):
    if sys.argv[1] == "on":
        die_with_parent(0, parent)
    while True:  # busy inside one batch, as a stuck worker would be
        pass

if __name__ == "__main__":
    proc = mp.get_context("fork").Process(target=child, args=(os.getpid(),), daemon=False)
    proc.start()
    print(proc.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
@pytest.mark.slow
def test_a_data_worker_dies_with_its_trainer(tmp_path):
    """SIGKILL the parent: a worker busy inside a batch is ended by the kernel."""
    script = tmp_path / "parent.py"
    script.write_text(DIES_WITH_PARENT)
    alive = {}
    for mode in ("on", "off"):
        parent = subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 5
        while time.time() < deadline and Path(f"/proc/{child}").exists():
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break
            time.sleep(0.05)
        state = Path(f"/proc/{child}/stat")
        alive[mode] = state.exists() and state.read_text().split()[2] != "Z"
        if alive[mode]:
            os.kill(child, signal.SIGKILL)
    assert alive == {"on": False, "off": True}  # without it the busy child runs on


def test_a_shard_with_altered_bytes_is_refused_not_trained_on(tmp_path, four_kingdom_shards):
    """Bytes flipped inside a sequence leave the tar readable: only the manifest's checksum
    tells, and the loader checks it before reading."""
    shards = tmp_path / "shards"
    shutil.copytree(four_kingdom_shards, shards)
    tar = sorted((shards / "fungi").glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x20 for b in data[middle : middle + 64])
    tar.write_bytes(bytes(data))
    cfg = DataConfig(str(shards), seq_len=256, num_workers=0, shuffle_buffer=8)
    with pytest.raises(BadShardError, match=r"fungi/train-000000\.tar is unreadable.*SHA-256"):
        _take(TrainLoader(cfg, CharTokenizer(), 16, 0), 60)
    trusting = DataConfig(str(shards), seq_len=256, num_workers=0, verify_shards=False)
    assert len(_take(TrainLoader(trusting, CharTokenizer(), 16, 0), 5)) == 5  # it would train
