"""Hugging Face interop: every export loads with transformers' Auto classes
(``trust_remote_code``) and computes nucleo's own logits; saved classifiers load with
AutoModelForSequenceClassification and give nucleo's probabilities; AutoTokenizer encodes as
nucleo's char, k-mer and BPE tokenizers do; and exports written before all this still load.

Offline: the exports, classifiers and the BPE are made here, from tiny models and real DNA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.hf_tokenizer import HF_CONFIG, HF_FILE, NUCLEO_FILE
from data_pipeline.readers import read_sequences
from data_pipeline.shards import ShardOptions, build_shards
from data_pipeline.sources import SourceFile
from data_pipeline.tokenizers import build_tokenizer, load_tokenizer, train_bpe
from nucleo.downstream.classifier import (
    SequenceClassifier,
    load_classifier,
    predict_proba,
    save_classifier,
)
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import HF_MODULE, export_model, load_exported
from tests.architectures.test_architectures import CAUSAL, VARIANTS
from tests.conftest import sample_file

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]')"
)
LAMBDA = sample_file("viral/lambda.fasta.gz")


def _export(root: Path, variant: str, tokenizer=None, seed: int = 0) -> Path:
    arch, sets = VARIANTS[variant]
    cfg = load_config(arch=arch, overrides=sets)
    tokenizer = tokenizer or build_tokenizer("char")
    torch.manual_seed(seed)
    model = build_model(arch, cfg.model, tokenizer)
    return export_model(model.state_dict(), cfg, tokenizer, root / variant, {"step": 1})


@pytest.fixture(scope="module")
def lambda_text() -> str:
    return str(next(read_sequences(LAMBDA)).seq)


def _batch(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of real DNA ids, the second right-padded after 17 tokens."""
    tokens = torch.from_numpy(build_tokenizer("char").encode(text[1000:1064])).view(2, 32)
    mask = torch.ones_like(tokens)
    mask[1, 17:] = 0
    return tokens.masked_fill(mask == 0, 5), mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_family_loads_with_auto_classes_and_gives_nucleos_logits(
    variant, tmp_path, lambda_text
):
    export = _export(tmp_path, variant)
    ref, _, meta = load_exported(export)
    causal = variant in CAUSAL
    config = transformers.AutoConfig.from_pretrained(export, trust_remote_code=True)
    assert (config.model_type, config.arch, config.causal) == ("nucleo", meta["arch"], causal)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    hf, info = auto.from_pretrained(export, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert type(hf).__name__ == ("NucleoForCausalLM" if causal else "NucleoForMaskedLM")
    # the weights are nucleo's, buffers included, and the shared ones are still shared
    hf_state = {k.removeprefix("nucleo."): v for k, v in hf.state_dict().items()}
    assert hf_state.keys() == ref.state_dict().keys()
    for name, value in ref.state_dict().items():
        assert torch.equal(hf_state[name], value), name
    for name, value in ref.named_buffers():  # non-persistent ones too
        assert torch.equal(hf.get_buffer(f"nucleo.{name}"), value), name
    shared: dict[int, list[str]] = {}  # e.g. the tied embedding and head, one tensor
    for name, param in ref.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    for names in shared.values():
        assert len({id(hf.nucleo.get_parameter(n)) for n in names}) == 1, names
    tokens, mask = _batch(lambda_text)
    with torch.no_grad():
        for attention_mask in (None, mask):
            want = ref(tokens, attention_mask=attention_mask)
            got = hf(input_ids=tokens, attention_mask=attention_mask)
            torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
        base = transformers.AutoModel.from_pretrained(export, trust_remote_code=True)
        hidden = base(input_ids=tokens, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(
            hidden, ref(tokens, attention_mask=mask).hidden, rtol=0, atol=1e-5
        )
    assert hf.training is False and hf.dtype == torch.float32


def test_generate_is_nucleos_greedy_continuation(tmp_path, lambda_text):
    export = _export(tmp_path, "transformer")
    ref, tokenizer, _ = load_exported(export)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    prompt = torch.from_numpy(tokenizer.encode(lambda_text[:20]))[None]
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    want = prompt
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat([want, ref(want).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, want)
    padded = torch.ones(2, prompt.shape[1], dtype=torch.long)
    padded[1, -3:] = 0
    with pytest.raises(ValueError, match="prompts of equal length, unpadded"):
        hf.generate(prompt.repeat(2, 1), attention_mask=padded, max_new_tokens=2)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> object:
    """A 200-token BPE learned on lambda (about 0.2 s)."""
    root = tmp_path_factory.mktemp("bpe")
    options = ShardOptions(min_shards=1, val_fraction=0.0)
    build_shards([SourceFile(LAMBDA, "viral")], root / "shards", options, log=lambda _: None)
    return train_bpe(root / "shards", root / "bpe.json", vocab_size=200, log=lambda _: None)


TOKENIZERS = ["char", "kmer1", "kmer2", "kmer3", "kmer6", "bpe"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_auto_tokenizer_encodes_as_nucleo(name, tmp_path, bpe, lambda_text):
    if name == "bpe":
        tok = bpe
    elif name == "char":
        tok = build_tokenizer("char")
    else:
        tok = build_tokenizer("kmer", {"k": int(name[4:])})
    tok.save(tmp_path)
    assert {NUCLEO_FILE, HF_FILE, HF_CONFIG} <= {p.name for p in tmp_path.iterdir()}
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert load_tokenizer(tmp_path).vocab == tok.vocab
    specials = (hf.pad_token_id, hf.mask_token_id, hf.bos_token_id, hf.eos_token_id)
    assert specials == (tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id)
    rng = np.random.default_rng(0)
    texts = ["", "N", "acgtn", "ACGTNNACGTACGTAC", "AC-GT RYKM\nacg"]
    for _ in range(60):  # real DNA with lower case, N runs and other letters sprinkled in
        start, length = rng.integers(0, 40_000), rng.integers(0, 80)
        chars = list(lambda_text[start : start + length])
        for i in rng.integers(0, max(1, len(chars)), size=rng.integers(0, 4)):
            if chars:
                chars[i] = str(rng.choice(list("NNNnacgtRYx")))
        texts.append("".join(chars))
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text).tolist(), text
    batch = hf(texts[2:5], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1] == tok.pad_id and batch["attention_mask"][0].sum() < 16


def test_classifier_loads_with_auto_and_gives_nucleos_probabilities(tmp_path, lambda_text):
    export = _export(tmp_path, "transformer-bi")
    _downgrade(export)  # a classifier fine-tuned from an older export gets the new files too
    backbone, tokenizer, _ = load_exported(export)
    torch.manual_seed(1)
    model = SequenceClassifier(backbone, 32, 3)
    info = {"classes": ["phage", "plasmid", "plastid"], "max_tokens": 64}
    saved = save_classifier(model, export, info, tmp_path / "clf")
    ours, _, _ = load_classifier(saved, "cpu")
    auto = transformers.AutoModelForSequenceClassification
    hf, loading = auto.from_pretrained(saved, trust_remote_code=True, output_loading_info=True)
    assert not any(loading.values()), loading
    assert hf.config.id2label == dict(enumerate(info["classes"]))
    hf_tok = transformers.AutoTokenizer.from_pretrained(saved, trust_remote_code=True)
    texts = [lambda_text[5000:5040], lambda_text[9000:9023], lambda_text[100:131]]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = hf(**batch).logits.softmax(-1)
        want = ours(batch["input_ids"], batch["attention_mask"].bool()).softmax(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    ids = [tokenizer.encode(t) for t in texts]
    alone = predict_proba(ours, ids, 1, tokenizer.pad_id, torch.device("cpu"))
    with torch.no_grad():
        hf_alone = [hf(**hf_tok(t, return_tensors="pt")).logits.softmax(-1)[0] for t in texts]
    np.testing.assert_allclose(torch.stack(hf_alone).numpy(), alone, rtol=0, atol=1e-6)


def _downgrade(export: Path) -> None:
    """Make an export look like one written before the Hugging Face files existed."""
    spec = json.loads((export / NUCLEO_FILE).read_text())
    for name in (NUCLEO_FILE, HF_CONFIG, HF_MODULE):
        (export / name).unlink()
    (export / HF_FILE).write_text(json.dumps(spec))
    meta = json.loads((export / "config.json").read_text())
    for key in ("model_type", "auto_map", "architectures", "complement_ids", "dtype"):
        meta.pop(key)
    (export / "config.json").write_text(json.dumps(meta))


def test_older_exports_and_tokenizer_files_still_load(tmp_path, bpe, lambda_text):
    export = _export(tmp_path, "caduceus", build_tokenizer("kmer", {"k": 3}))
    model, _, _ = load_exported(export)
    _downgrade(export)
    old, tokenizer, meta = load_exported(export)
    assert tokenizer.name == "kmer" and tokenizer.k == 3 and "auto_map" not in meta
    tokens = torch.from_numpy(tokenizer.encode(lambda_text[:300]))[None]
    with torch.no_grad():
        torch.testing.assert_close(old(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    # an old run folder's BPE, tokenizer.json in nucleo's format
    run = tmp_path / "run"
    run.mkdir()
    (run / HF_FILE).write_text(json.dumps(bpe.to_json()))
    assert (
        load_tokenizer(run).encode(lambda_text[:500]).tolist()
        == bpe.encode(lambda_text[:500]).tolist()
    )
    # a Hugging Face tokenizer.json alone is named, not misread
    bpe.save(run)
    (run / NUCLEO_FILE).unlink()
    with pytest.raises(ValueError, match=r"run/tokenizer.json: a Hugging Face tokenizer"):
        load_tokenizer(run)
