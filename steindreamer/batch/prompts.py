"""Reading PROMPTS: a text file (one prompt a line, # comments) or JSONL, every line and every
item's config validated before anything runs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

DEFAULT_PRESET = "steindreamer"  # what `generate` uses when given neither --preset nor --config


@dataclass
class Item:
    line: int  # line number in PROMPTS, for messages
    prompt: str
    seed: int
    overrides: list[str]  # the item's own key=value list (from JSONL), applied after the batch's
    steps: int  # the item's steps over all stages, for the progress display
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.prompt, self.seed)



JSONL_KEYS = ("prompt", "seed", "overrides")


def _override_text(value) -> str:
    """A JSON value as the right-hand side of an OmegaConf `key=value` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _parse_jsonl_line(text: str, where: str) -> tuple[str, list[str]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object like {{\"prompt\": \"a red cube\"}}")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(JSONL_KEYS)})")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise UserError(f"{where}: 'prompt' must be a string")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UserError(f"{where}: 'seed' must be a non-negative integer")
    raw = obj.get("overrides", {})
    if isinstance(raw, dict):
        item_overrides = [f"{k}={_override_text(v)}" for k, v in raw.items()]
    elif isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        item_overrides = list(raw)
    else:
        raise UserError(f"{where}: 'overrides' must be an object like {{\"steps\": 500}} or a list of \"key=value\" strings")
    if seed is not None:  # the item's seed is an override like any other
        item_overrides.append(f"seed={seed}")
    return prompt, item_overrides


def read_prompts(path: Path, preset: str | None, config_file: str | None, overrides: list[str]) -> list[Item]:
    """Parse and validate every line before anything runs: a typo on line 900 is exit 2 now, not a
    failure hours later. Per-item configs are checked too (cheap: no model is loaded)."""
    from ..config import load_config
    from ..prompt import check_prompt

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"prompts file is a folder: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise UserError(f"prompts file {path} has no prompts (blank lines and # comments are ignored)")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or lines[0][1].startswith("{")

    # The batch-wide config, checked once (a bad --preset or override is the batch's error, not the item's).
    preset = None if config_file else preset or DEFAULT_PRESET
    base = load_config(preset, config_file, overrides)
    items: list[Item] = []
    seen: dict[tuple, int] = {}
    for n, line in lines:
        where = f"{path.name} line {n}"
        if jsonl:
            prompt, item_overrides = _parse_jsonl_line(line, where)
        else:
            prompt, item_overrides = line, []
        try:
            prompt = check_prompt(prompt)  # a model's vocabulary is the child's to check: a failed item, not a failed batch
            cfg = load_config(preset, config_file, overrides + item_overrides) if item_overrides else base
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        mesh = getattr(cfg, "mesh", None)  # the mesh stage's steps follow the NeRF's in metrics.jsonl
        steps = cfg.train.steps + (mesh.steps if mesh is not None and mesh.enabled else 0)
        item = Item(n, prompt, cfg.train.seed, item_overrides, steps)
        if item.key in seen:
            raise UserError(f"{where}: same prompt and seed as line {seen[item.key]}")
        seen[item.key] = n
        items.append(item)
    return items


def check_runnable(preset: str | None, config_file: str | None, overrides: list[str]) -> None:
    """The batch-wide config on this machine: its backends and its models (found offline first, or
    one line in seconds; locate.py), before any item starts. An item's own model override is that
    item's to fail."""
    from ..config import check_machine, load_config
    from ..guidance.locate import locate_all

    base = load_config(None if config_file else preset or DEFAULT_PRESET, config_file, overrides)
    check_machine(base)
    locate_all(base.guidance)
