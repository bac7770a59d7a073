"""The built-in model's vocabulary and its offline tokenizer. The words are written into the model's
folder (`steindreamer.json`), from which `steindreamer.prompt` checks prompts."""
from __future__ import annotations

import itertools

from steindreamer.toy.world import COLOURS, SHAPES

VIEW_WORDS = ("front", "side", "back", "overhead", "view", ",")  # what view-dependent prompting appends
WORDS = ("a", *COLOURS, *SHAPES, *VIEW_WORDS)
# What a person types for the same thing: other articles, plurals (the world has one object a scene).
ALIASES = {"an": "a", "the": "a", "one": "a", **{f"{s}s": s for s in SHAPES}, "tori": "torus", "toruses": "torus"}
MAX_LENGTH = 16  # "a purple cylinder, overhead view" is 6 words + 2 markers


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
