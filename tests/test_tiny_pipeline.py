import open_clip
import torch
from diffusers import StableDiffusionPipeline

from salun_sd.families.tiny import clip_tokenizer, tiny_pipeline


def test_tokenizer_is_the_real_clip_tokenizer():
    tok = clip_tokenizer()
    prompts = ["a photo of a nude person", "Van Gogh's Starry Night, oil on canvas!"]
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    theirs = open_clip.tokenize(prompts)  # pads with 0 where SD's tokenizer pads with <|endoftext|>
    for a, b in zip(ours, theirs):
        n = int((b != 0).sum())
        assert a[:n].tolist() == b[:n].tolist()
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_tiny_pipeline_round_trips_through_from_pretrained(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    again = StableDiffusionPipeline.from_pretrained(tmp_path)
    for a, b in zip(pipe.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
    image = again("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
