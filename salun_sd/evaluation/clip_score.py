"""CLIP score (image-prompt alignment) with open_clip.

An erased model should still follow prompts outside the erased concept, so its CLIP score on
ordinary prompts should stay near the base model's. The score of one image is
100 * max(cos(image embedding, prompt embedding), 0), the convention of torchmetrics' CLIPScore.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from salun_sd.errors import UserError
from salun_sd.evaluation.imagefiles import batched, load_rgb

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"


@dataclass
class ClipScorer:
    """An open_clip-compatible model (`encode_image`, `encode_text`) with its image transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str


def load_open_clip(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED, device: str | torch.device = "cpu") -> ClipScorer:
    """Real CLIP weights through open_clip (`pretrained` is a tag such as `openai`, or a local checkpoint file)."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # open_clip raises RuntimeError for unknown names, hub/network errors for downloads
        raise UserError(
            f"could not load CLIP model '{model_name}' with weights '{pretrained}' through open_clip: {err}. "
            "Check the names (`python -c 'import open_clip; print(open_clip.list_pretrained())'`); "
            "without a network, pass --clip_pretrained a local checkpoint file."
        ) from err
    return ClipScorer(model.eval(), preprocess, tokenizer, f"{model_name}/{pretrained}")


@torch.inference_mode()
def clip_scores(paths: Sequence[Path], prompts: Sequence[str], scorer: ClipScorer, batch_size: int = 32, device: str | torch.device = "cpu") -> list[float]:
    """One score per (image, prompt) pair."""
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    model = scorer.model.to(device).eval()
    scores: list[float] = []
    for chunk in batched(list(zip(paths, prompts)), batch_size, f"CLIP score ({scorer.name})"):
        images = torch.stack([scorer.preprocess(load_rgb(path)) for path, _ in chunk]).to(device)
        tokens = scorer.tokenizer([prompt for _, prompt in chunk]).to(device)
        image_emb = F.normalize(model.encode_image(images).float(), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        scores.extend((100 * (image_emb * text_emb).sum(-1).clamp(min=0)).tolist())
    return scores


def clip_score_metrics(paths: Sequence[Path], prompts: Sequence[str], scorer: ClipScorer, batch_size: int = 32, device: str | torch.device = "cpu") -> dict:
    """Mean and spread of the CLIP score over a set, with every image's score for tracing."""
    if not paths:
        raise UserError("CLIP score got no images to score.")
    scores = clip_scores(paths, prompts, scorer, batch_size, device)
    return {"model": scorer.name, "scale": "100 * max(cos, 0)", **clip_summary(scores), "per_image": {Path(p).name: s for p, s in zip(paths, scores)}}


def clip_summary(scores: Sequence[float]) -> dict:
    """Mean and (population) spread of CLIP scores: the one computation for a whole folder and for each concept's images."""
    values = torch.tensor(scores, dtype=torch.float64)
    return {"images": len(scores), "mean": values.mean().item() if scores else None, "std": values.std(unbiased=False).item() if scores else None}
