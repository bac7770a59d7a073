"""The built-in model's vocabulary and a prompt check that fails early with one clear line."""
from __future__ import annotations

import itertools
import re

from steindreamer.toy.world import COLOURS, SHAPES

WORDS = ("a", *COLOURS, *SHAPES, "front", "side", "back", "overhead", "view", ",")
MAX_LENGTH = 16  # "a purple cylinder, overhead view" is 6 words + 2 markers


def words(prompt: str) -> list[str]:
    """Lower-cased words and commas, as the tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]+", prompt.lower())


def check_prompt(prompt: str) -> None:
    """Raise ValueError naming every word the built-in model does not know."""
    unknown = [w for w in words(prompt) if w not in WORDS]
    if unknown:
        uniq = ", ".join(dict.fromkeys(repr(w) for w in unknown))
        raise ValueError(f"the built-in toy model does not know {uniq} in {prompt!r}; "
                         f"its vocabulary is: {' '.join(WORDS)}")
    if len(words(prompt)) + 2 > MAX_LENGTH:
        raise ValueError(f"prompt too long for the built-in toy model ({len(words(prompt))} words, at most {MAX_LENGTH - 2})")


def build_tokenizer():
    """A CLIP BPE tokenizer (built offline, no download) in which every vocabulary word is one token.

    It is a stock `CLIPTokenizer`, so `CLIPTokenizer.from_pretrained`, `AutoTokenizer` and the
    Stable Diffusion pipeline all load it alike. The BPE merges spell each word out letter by letter;
    where an earlier merge splits a word differently, a merge joining those pieces is added.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # CLIP: pad = unk = end-of-text
    add = lambda t: vocab.setdefault(t, len(vocab))  # noqa: E731
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in WORDS}
    for p in pieces.values():
        for ch in p:
            add(ch)
    merges: list[tuple[str, str]] = []
    for _ in range(10):
        for w, p in pieces.items():
            for a, b in zip(itertools.accumulate(p[:-1]), p[1:]):
                if (a, b) not in merges:
                    merges.append((a, b))
                add(a + b)
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)
        pieces = {w: tok.tokenize(w) for w in WORDS}
        if all(len(p) == 1 for p in pieces.values()):
            return tok
    raise RuntimeError("could not build a one-token-per-word BPE")
