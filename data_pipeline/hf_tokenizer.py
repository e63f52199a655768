"""Hugging Face twins of nucleo's tokenizers, and the files a tokenizer is saved as.

A saved tokenizer is two descriptions of one vocabulary:

    nucleo_tokenizer.json    nucleo's own (``load_tokenizer`` reads it)
    tokenizer.json           the same tokenizer in Hugging Face ``tokenizers`` format, with
    tokenizer_config.json    its special tokens: ``AutoTokenizer.from_pretrained(folder)``

The twin encodes as nucleo's ``encode`` does, id for id: bases of either case, anything else
is ``N``; no BOS/EOS is added (nucleo adds none); k-mers are cut from the start of each run of
A/C/G/T between N's and leftovers become single bases (a regex ``[ACGT]{k}|.`` that the
pre-tokenizer splits on, leftmost match first, gives exactly that). Two differences, both
outside DNA text: nucleo reads bytes, the twin reads characters (a non-ASCII character is one
``N`` there, one ``N`` per UTF-8 byte in nucleo, whose ``str`` input must be ASCII); and the
text ``<pad>`` is the pad token for the twin, five N's for nucleo (which has no text form of
its specials).

Old folders whose ``tokenizer.json`` is nucleo's format (before the twin existed) still load:
``load_tokenizer`` tells the two formats apart by content (``is_hf_spec``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nucleo.core import alphabet

NUCLEO_FILE = "nucleo_tokenizer.json"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
SPECIALS = {
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
}


def is_hf_spec(spec: Any) -> bool:
    """Whether a parsed JSON file is a Hugging Face tokenizer (top level ``model`` and
    ``added_tokens``) rather than nucleo's description (a ``type`` name and a ``vocab``)."""
    return isinstance(spec, dict) and "model" in spec and "added_tokens" in spec


def _normalizer() -> Any:
    """Upper-case a c g t n; any other character becomes N (as nucleo's byte table does)."""
    from tokenizers import Regex, normalizers

    upper = [normalizers.Replace(c, c.upper()) for c in "acgtn"]
    return normalizers.Sequence([*upper, normalizers.Replace(Regex("[^ACGTN]"), "N")])


def _finish(tk: Any, vocab: Sequence[str]) -> Any:
    """Mark nucleo's specials (ids 5-8, in the model's vocabulary so that they keep those
    ids) as special tokens, never normalised; add the normaliser and a spaceless decoder."""
    from tokenizers import AddedToken, decoders

    tk.normalizer = _normalizer()
    tk.decoder = decoders.Fuse()
    specials = [t for t in alphabet.VOCAB if t in alphabet.SPECIAL_TOKENS]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    ids = [tk.token_to_id(t) for t in specials]
    if ids != [vocab.index(t) for t in specials]:  # the specials must keep nucleo's ids 5-8
        raise ValueError(f"special token ids {ids} differ from nucleo's {list(range(5, 9))}")
    return tk


def word_level(vocab: Sequence[str], k: int | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` for ``char`` (k None: one token per character) or ``kmer``
    (vocab: the alphabet then the 4^k k-mers): one vocabulary lookup per pre-token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    # later entries win: with k = 1 the k-mers "A".."T" (ids 9-12) are what nucleo emits
    table = {t: i for i, t in enumerate(vocab)}
    tk = Tokenizer(models.WordLevel(table, unk_token="N"))
    pattern = "." if k is None else f"[ACGT]{{{k}}}|."
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return _finish(tk, vocab)


def bpe(hf_spec: dict[str, Any], vocab: Sequence[str]) -> Any:
    """The trained BPE (``hf_spec``: its ``tokenizers`` JSON) renumbered to nucleo's ids
    (merges are by token text, so renumbering keeps the segmentation), with the normaliser."""
    from tokenizers import Tokenizer

    spec = json.loads(json.dumps(hf_spec))
    index = {t: i for i, t in enumerate(vocab)}
    tokens = [*spec["model"]["vocab"], *alphabet.SPECIAL_TOKENS]
    spec["model"]["vocab"] = {t: index[t] for t in tokens}
    spec["added_tokens"] = []
    return _finish(Tokenizer.from_str(json.dumps(spec)), vocab)


def save(directory: str | Path, spec: dict[str, Any], hf: Any, indent: int | None = None) -> Path:
    """Write nucleo's description (``spec``) and its Hugging Face twin ``hf`` (a
    ``tokenizers.Tokenizer``) into ``directory``; the path of nucleo's file."""
    root = Path(directory)
    path = root / NUCLEO_FILE
    path.write_text(json.dumps(spec, indent=indent) + "\n")
    hf.save(str(root / HF_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIALS,
        "padding_side": "right",  # nucleo's models take right padding
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    (root / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path
