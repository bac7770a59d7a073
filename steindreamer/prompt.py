"""The prompt a person typed, checked once before any model loads: not empty, bounded, no control
characters and, for a model whose folder lists its vocabulary (`steindreamer.json`: "vocabulary",
"view_words", "max_words", "aliases", "ignored"; the built-in model's does), only words that model
knows. For such a model the prompt is also put in its words: lower case, single spaces, aliases
replaced ("an" -> "a", "cubes" -> "cube"), ignored marks dropped (a closing full stop)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError

MAX_CHARACTERS = 1000
MODEL_CARD = "steindreamer.json"


def words(prompt: str) -> list[str]:
    """Lower-cased words and punctuation runs, as the built-in tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]+", prompt.lower())


def model_vocabulary(location: str) -> dict | None:
    """{"vocabulary", "view_words", "max_words"} from a model folder's card, or None (no card, a hub id)."""
    card = Path(location) / MODEL_CARD
    if not card.is_file():
        return None
    try:
        info = json.loads(card.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the model card {card}: {err}") from None
    if not isinstance(info.get("vocabulary"), list):
        return None
    return {"vocabulary": info["vocabulary"], "view_words": info.get("view_words", []), "max_words": info.get("max_words"),
            "aliases": info.get("aliases", {}), "ignored": info.get("ignored", [])}


def _join(tokens: list[str]) -> str:
    """Words with single spaces, punctuation attached to the word before it ("a cube, front view")."""
    text = ""
    for token in tokens:
        text += token if (not text or not token[0].isalnum()) else " " + token
    return text


def check_prompt(prompt: str, model_location: str | None = None) -> str:
    """The prompt stripped (and in the model's words, for a model with a vocabulary), or a one-line
    UserError naming what is wrong with it."""
    prompt = prompt.strip()
    if not prompt:
        raise UserError("the prompt is empty")
    if len(prompt) > MAX_CHARACTERS:
        raise UserError(f"the prompt is {len(prompt)} characters long; at most {MAX_CHARACTERS} are allowed")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in prompt):
        raise UserError("the prompt contains control characters")
    known = model_vocabulary(model_location) if model_location else None
    if known is not None:
        said = [known["aliases"].get(w, w) for w in words(prompt) if w not in known["ignored"]]
        unknown = [w for w in said if w not in known["vocabulary"]]
        if unknown:
            listed = " ".join(w for w in known["vocabulary"] if w not in known["view_words"])
            raise UserError(f"the model does not know {', '.join(dict.fromkeys(repr(w) for w in unknown))} in {prompt!r}; "
                            f"its vocabulary is: {listed}")
        if known["max_words"] is not None and len(said) > known["max_words"]:
            raise UserError(f"the prompt has {len(said)} words; this model reads at most {known['max_words']}")
        if not said:
            raise UserError("the prompt is empty")
        prompt = _join(said)
    return prompt
