"""Tokenizers for the models: a local pretrained Chinese BERT's, or a WordPiece vocabulary
built from the training captions and tag texts (one token per CJK character, as
bert-base-chinese does), saved in the ``BertTokenizerFast`` layout; and :func:`oov`, how
much of some texts a tokenizer cannot represent (tokens that become ``[UNK]``).

Nothing here reaches a model hub: pretrained tokenizers load from local directories only.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer trained on ``texts``; each CJK character is a token."""
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.models import WordPiece

    wordpiece = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                       lowercase=True)
    wordpiece.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    # the trainer numbers tokens of equal frequency in hash order: renumber them (special
    # tokens first, then by string) so that the same texts always give the same ids
    tokens = sorted(t for t in wordpiece.get_vocab() if t not in SPECIAL_TOKENS)
    wordpiece._tokenizer.model = WordPiece({t: i for i, t in enumerate(SPECIAL_TOKENS + tokens)}, unk_token="[UNK]")
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=True, tokenize_chinese_chars=True,
                             unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                             mask_token="[MASK]")


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a local directory (a pretrained BERT's, or one mmcn built)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer directory (a local pretrained BERT such as a downloaded "
                                "bert-base-chinese, or a model folder written by mmcn)")
    return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)


_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def detokenize(text: str) -> str:
    """A decoded WordPiece string back to Chinese text: drop the spaces the decoder puts
    next to Chinese characters and punctuation, keep those between other words."""
    words = text.split()
    out = words[:1]
    for w in words[1:]:
        out.append(w if _CJK.match(w[0]) or _CJK.match(out[-1][-1]) else " " + w)
    return "".join(out)


@dataclass(frozen=True)
class Oov:
    """Out-of-vocabulary share of some texts: ``unknown`` of their ``tokens`` (special tokens
    aside) are ``[UNK]``; ``pieces`` counts the text each ``[UNK]`` stands for (a character,
    or a whole word the WordPiece vocabulary cannot spell)."""

    tokens: int
    unknown: int
    pieces: Counter

    @property
    def rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    def top(self, n: int = 20) -> str:
        """The ``n`` most frequent unknown pieces, most frequent first: ``猫×3 狗×1``."""
        return " ".join(f"{piece}×{count}" for piece, count in self.pieces.most_common(n))

    def metrics(self) -> dict:
        """The metrics file's fields: ``oov_rate`` (a share, not percent), ``oov_unk_tokens`` of
        ``oov_total_tokens``, ``oov_top`` (:meth:`top`)."""
        return {"oov_rate": round(self.rate, 6), "oov_unk_tokens": self.unknown, "oov_total_tokens": self.tokens,
                "oov_top": self.top()}

    def describe(self, what: str) -> str:
        """One log line: ``train captions: 1.2% of 5000 tokens are [UNK] (猫×3 …)``."""
        line = f"{what}: {100 * self.rate:.2f}% of {self.tokens} tokens are [UNK]"
        return line + (f" ({self.top()})" if self.unknown else "")


def oov(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch: int = 4096) -> Oov:
    """How many tokens of ``texts`` ``tokenizer`` (a fast one) maps to ``[UNK]``, and what they are."""
    unk, tokens, unknown, pieces = tokenizer.unk_token_id, 0, 0, Counter()
    for first in range(0, len(texts), batch):
        chunk = list(texts[first:first + batch])
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for text, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            tokens += len(ids)
            for token_id, (start, end) in zip(ids, offsets):
                if token_id == unk:
                    unknown += 1
                    pieces[text[start:end]] += 1
    return Oov(tokens, unknown, pieces)
