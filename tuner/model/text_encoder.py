"""The T5 text encoder Infinity reads its prompts through, from a local directory (no downloads).

As the official inference does it (FoundationVision/Infinity @4c27bbb, ``tools/run_infinity.py``:
``load_tokenizer`` and ``encode_prompt``): ``AutoTokenizer.from_pretrained(dir, legacy=True)`` and
``T5EncoderModel.from_pretrained(dir)``; each prompt on its own, tokenized with
``padding="max_length"`` and truncation to the model's text length (512 for flan-t5-xl), the
encoder's ``last_hidden_state`` in float32, cut to the prompt's valid tokens. The official code loads
the encoder in fp16 on the GPU; here it is fp16 on CUDA and fp32 on the CPU (fp16 matmuls there are
slow and not what a CPU check should compare).

``transformers`` is an optional extra (``pip install -e '.[infinity]'``); it is imported only when an
encoder is loaded. Weights are read with ``local_files_only=True`` (safetensors, or ``.bin`` files that
transformers opens with ``weights_only=True``); no remote code runs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tuner.errors import UserError

INSTALL_HINT = "pip install -e '.[infinity]' (transformers + sentencepiece)"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
_FINGERPRINT_BYTES = 1 << 20


def check_text_encoder_dir(directory: str | Path, flag: str = "--weights-dir") -> Path:
    """Cheap, read-only proof that ``directory`` holds a T5 encoder (config, tokenizer, weights)."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"T5 text encoder directory not found: {d}; put the flan-t5-xl folder "
                        f"(config.json, tokenizer, weights) there, via {flag}")
    config = d / "config.json"
    if not config.is_file():
        raise UserError(f"{d} has no config.json; pass the flan-t5-xl folder as downloaded from the hub")
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{config} is not a readable JSON model config; re-download the flan-t5-xl folder") \
            from None
    if kind != "t5":
        raise UserError(f"{d} holds a {kind!r} model, not T5; pass the flan-t5-xl folder")
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{d} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the tokenizer files "
                        "of flan-t5-xl there")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in d.iterdir()):
        raise UserError(f"{d} has no weights (*.safetensors or *.bin); copy the flan-t5-xl weights there")
    return d


def encoder_fingerprint(directory: Path) -> str:
    """Short identity of an encoder folder: its config and tokenizer files, and each weight file's name,
    size, first and last MiB (not a full hash: the XL weights are ~11 GB, and any retrained or other
    file differs there)."""
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if not p.is_file():
            continue
        if p.suffix in WEIGHT_SUFFIXES:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(_FINGERPRINT_BYTES)
                f.seek(max(0, size - _FINGERPRINT_BYTES))
                tail = f.read()
            h.update(f"{p.name}:{size}".encode() + head + tail)
        elif p.suffix == ".json" or p.name in TOKENIZER_FILES:
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class T5TextEncoder:
    """A loaded tokenizer + T5 encoder, and the features of every prompt it has encoded (a prompt's
    features depend on its text alone, so each is computed once per process).

    max_length: tokens per prompt at most (the Infinity model's ``text_maxlen``; 512 for 2B/8B).
    """

    directory: Path
    tokenizer: Any
    model: Any  # transformers.T5EncoderModel
    max_length: int
    fingerprint: str
    _features: dict = field(default_factory=dict, repr=False)

    @property
    def d_model(self) -> int:
        return int(self.model.config.d_model)

    def encode_one(self, prompt: str):
        """``[n, d_model]`` float32 features of one prompt on the CPU (``n``: its tokens, end token
        included)."""
        import torch

        if prompt not in self._features:
            tokens = self.tokenizer(text=[prompt], max_length=self.max_length, padding="max_length",
                                    truncation=True, return_tensors="pt")
            device = next(self.model.parameters()).device
            with torch.no_grad():
                out = self.model(input_ids=tokens.input_ids.to(device),
                                 attention_mask=tokens.attention_mask.to(device))["last_hidden_state"]
            n = int(tokens.attention_mask.sum())
            self._features[prompt] = out[0, :n].float().cpu()
        return self._features[prompt]

    def encode(self, prompts: Sequence[str]):
        """``(features [B, T, d_model] float32 on the CPU, lens)``: T the longest prompt's tokens, zeros
        after each prompt's own (the engine reads ``lens``, as the official varlen kernels do)."""
        import torch

        feats = [self.encode_one(q) for q in prompts]
        lens = tuple(f.shape[0] for f in feats)
        out = torch.zeros(len(feats), max(lens), self.d_model)
        for i, f in enumerate(feats):
            out[i, :f.shape[0]] = f
        return out, lens


def load_text_encoder(directory: str | Path, *, max_length: int, text_channels: int,
                      device: str | Any = "cpu") -> T5TextEncoder:
    """Load the T5 tokenizer and encoder from a local folder; one-line :class:`UserError` when
    transformers is missing, the folder is incomplete, a tensor is missing or mis-shaped (strict), or
    its width is not the model's ``text_channels``."""
    import torch

    d = check_text_encoder_dir(directory)
    try:
        from transformers import AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise UserError(f"real Infinity weights need the T5 text encoder, read through transformers, which "
                        f"is not installed; {INSTALL_HINT}") from None
    hf_logging.set_verbosity_error()  # no "loading weights" bars between our progress lines
    hf_logging.disable_progress_bar()
    dev = torch.device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), legacy=True, local_files_only=True)
        model, info = T5EncoderModel.from_pretrained(
            str(d), local_files_only=True, output_loading_info=True,
            dtype=torch.float16 if dev.type == "cuda" else torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the T5 encoder from {d} ({first}); re-download the flan-t5-xl folder")\
            from None
    # transformers fills missing or mis-shaped tensors with random ones and only warns (silenced above):
    # strict here, as for the transformer. Unexpected keys are fine (flan-t5-xl also holds the decoder).
    bad = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if bad:
        raise UserError(f"the T5 encoder in {d} lacks or mis-shapes {len(bad)} tensor(s) (first: {bad[0]}); "
                        "re-download the flan-t5-xl folder")
    width = int(model.config.d_model)
    if width != text_channels:
        raise UserError(f"the T5 encoder in {d} gives {width}-wide features but the Infinity model reads "
                        f"{text_channels}; pass the encoder it was trained with (flan-t5-xl: 2048)")
    model = model.to(dev).eval().requires_grad_(False)
    return T5TextEncoder(d, tokenizer, model, max_length, encoder_fingerprint(d))
