"""Split Chinese captions into the tokens that caption metrics count: characters or jieba words.

Two modes, both lower-casing the result and dropping whitespace, punctuation and symbols
(Unicode categories ``P*`` and ``S*``, which includes the full-width forms ``，。！？（）``):

``char`` (default; what OFA-CN scores on):
    Every CJK character is one token: Han ideographs (U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF,
    U+20000-3FFFF, and ``〇``), kana (U+3040-30FF) and Hangul syllables (U+AC00-D7AF).
    A maximal run of any other letters and digits (``str.isalnum``: ASCII, accented Latin,
    full-width ``ＡＢ１２``, ...) is one token. Every other character (whitespace, punctuation,
    symbols, ``_``, combining marks) separates tokens and is dropped.
    ``"一只猫，坐在3D打印的iPhone上。"`` -> ``一 只 猫 坐 在 3d 打 印 的 iphone 上``;
    ``"C++ 3.5米"`` -> ``c 3 5 米``.

``jieba`` (what the AI Challenger caption evaluation scores on):
    ``jieba.cut(text, cut_all=False)`` (default dictionary, HMM on); a word with no letter
    or digit in it (whitespace, punctuation, symbols) is dropped, every other word is kept
    whole, so ``"C++"`` stays ``c++`` and ``"3.5"`` stays ``3.5``.
"""
from __future__ import annotations

import re
from typing import Literal

Mode = Literal["char", "jieba"]
MODES: tuple[str, ...] = ("char", "jieba")

_CJK = "\u3007\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003ffff"
# One CJK character, or a run of letters/digits ([^\W_]) none of which is CJK.
_CHAR_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")


def tokenize(text: str, mode: Mode = "char") -> list[str]:
    """Tokens of ``text`` under ``mode`` (see the module docstring for the exact rules)."""
    if mode == "char":
        return _CHAR_TOKEN.findall(text.lower())
    if mode == "jieba":
        import jieba  # loads its dictionary (~1 s) on first use

        return [w.lower() for w in jieba.cut(text, cut_all=False) if any(c.isalnum() for c in w)]
    raise ValueError(f"unknown tokenize mode {mode!r}: use one of {', '.join(MODES)}")

