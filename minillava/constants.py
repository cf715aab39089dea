"""The few constants every part of minillava agrees on (one place, one spelling)."""

# Original LLaVA marks where the image goes with this id inside `input_ids`;
# the vocabulary is not extended, the model swaps it for the N_v visual tokens.
IMAGE_TOKEN_INDEX = -200
# Labels equal to this are not supervised (PyTorch's cross_entropy default).
IGNORE_INDEX = -100
# The placeholder as it is written in LLaVA JSON data and prompts.
IMAGE_PLACEHOLDER = "<image>"

# CLIPImageProcessor's normalisation (OpenAI CLIP's training statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
