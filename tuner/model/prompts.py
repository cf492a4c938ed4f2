"""Prompts for text-to-image models: the built-in evaluation set, prompt files, and the seeded stand-in
text features a random-weight model reads instead of a T5 encoder's.

A prompt set plays the role the class list plays for VAR: an evaluation's ``labels`` are indices into
it (image ``i`` shows ``prompts[labels[i]]``), so paired metrics compare the same prompt and seed.
Nothing here imports torch at module level.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tuner.errors import UserError

# Short, varied scenes (objects, animals, people, landscapes, styles); index order is part of every
# evaluation key, so append only.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red fox sitting in fresh snow, morning light",
    "a bowl of ramen with a soft-boiled egg, top view",
    "an old lighthouse on a rocky coast during a storm",
    "a watercolor painting of a small village by a river",
    "a portrait of an elderly fisherman with a grey beard",
    "a futuristic city skyline at night with neon signs",
    "a close-up photo of a honeybee on a sunflower",
    "a wooden cabin in a pine forest under the milky way",
    "a vintage red bicycle leaning against a brick wall",
    "a bowl of fresh fruit on a marble kitchen table",
    "a golden retriever puppy running on a beach",
    "an astronaut riding a horse on the moon, digital art",
    "a steaming cup of coffee next to an open book",
    "a snowy mountain peak reflected in a calm lake",
    "a colorful hot air balloon over green hills",
    "a pencil sketch of a cat sleeping on a windowsill",
)

MAX_PROMPTS = 100_000
MAX_PROMPT_CHARS = 2_000


def read_prompts(path: str | Path, flag: str = "--prompts") -> tuple[str, ...]:
    """One prompt per non-empty line of a UTF-8 text file (surrounding spaces dropped); one-line
    :class:`UserError` for a missing, unreadable, empty or oversized file."""
    p = Path(path)
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "not found"
        raise UserError(f"{flag} {p}: file {kind}; pass a text file with one prompt per line")
    try:
        if p.stat().st_size > MAX_PROMPTS * MAX_PROMPT_CHARS:
            raise UserError(f"{flag} {p} is too large for a prompt file; pass at most {MAX_PROMPTS} prompts")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {p} is not UTF-8 text; pass a text file with one prompt per line") from None
    except OSError as exc:
        raise UserError(f"{flag} {p} cannot be read ({exc.strerror or exc}); pass a readable file") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise UserError(f"{flag} {p} holds no prompt; write one prompt per line")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"{flag} {p} holds {len(prompts)} prompts; pass at most {MAX_PROMPTS}")
    long = next((i for i, q in enumerate(prompts) if len(q) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise UserError(f"{flag} {p}: prompt {long + 1} is longer than {MAX_PROMPT_CHARS} characters; "
                        "shorten it")
    return prompts


def prompts_digest(prompts: tuple[str, ...]) -> str:
    """Short stable hash of a prompt set (part of evaluation-cache keys: other prompts, other images)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def stand_in_length(prompt: str, maxlen: int) -> int:
    """Tokens of a prompt's stand-in features: its words plus one (T5's end token), at most ``maxlen``."""
    return max(1, min(maxlen, len(prompt.split()) + 1))


def stand_in_features(prompts: tuple[str, ...] | list[str], text_channels: int, maxlen: int):
    """Seeded random "T5 features" for a random-weight model: ``(features [B, T, text_channels] float32
    on the CPU, lens)``, T the longest prompt's length, zero padding after each prompt's own length.

    Each prompt's features depend on its text alone (seeded by its SHA-256), so a prompt reads the
    same features in any batch, with any neighbours: paired metrics compare like with like.
    """
    import torch

    from tuner.model.infinity_generate import random_text

    lens = [stand_in_length(q, maxlen) for q in prompts]
    out = torch.zeros(len(prompts), max(lens), text_channels)
    for i, (q, n) in enumerate(zip(prompts, lens)):
        seed = int.from_bytes(hashlib.sha256(q.encode()).digest()[:7], "big")
        out[i, :n] = random_text(1, text_channels, n, seed=seed)[0][0]
    return out, tuple(lens)
