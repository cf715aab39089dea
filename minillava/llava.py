"""LLaVA: X_v -> g (CLIP, frozen) -> Z_v -> W (projector) -> H_v, spliced into the LLaMA input.

    H_v = W(Z_v),  Z_v = g(X_v)           (paper, eq. 1)

Reading order: config -> projector W -> the model (encode images, splice, forward/loss) -> generate.
Shapes: B batch, T text tokens, N_v visual tokens, D_v vision width, D LLM width, V vocabulary.
Loading the published checkpoint layouts lives in checkpoint.py, saving in saving.py.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .clip import CLIPVisionConfig, CLIPVisionTower
from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .llama import KVCache, LlamaConfig, LlamaForCausalLM


@dataclass
class LLaVAConfig:
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    projector_type: str = "mlp2x_gelu"          # "linear" (LLaVA v1) or "mlp2x_gelu" (LLaVA-1.5)
    vision_feature_layer: int = -2              # penultimate CLIP layer (paper's ablation: last is -0.96)
    vision_feature_select_strategy: str = "default"   # "default" drops CLS, "full" keeps it
    image_aspect_ratio: str = "pad"             # "pad" to a square first (LLaVA-1.5) or "crop" (v1)
    conv_mode: str = "vicuna_v1"                # the prompt template the model was trained with
    image_token_index: int = 0                  # only for transformers (see saving.save_llava)

    @property
    def num_image_tokens(self):                 # N_v: 576 for ViT-L/14 at 336 px
        n = self.vision.num_patches
        return n if self.vision_feature_select_strategy == "default" else n + 1

# ---------------------------------------------------------------- the projection W


class Projector(nn.Module):
    """W: Z_v (D_v) -> H_v (D). 'linear' in the paper, a 2-layer GELU MLP in LLaVA-1.5.
    Named as llava-hf names it (`multi_modal_projector.linear_1`, `.linear_2`)."""

    def __init__(self, projector_type, D_v, D):
        super().__init__()
        if projector_type not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector type {projector_type!r}: expected 'linear' or 'mlp2x_gelu'")
        self.linear_1 = nn.Linear(D_v, D)
        if projector_type == "mlp2x_gelu":
            self.linear_2 = nn.Linear(D, D)

    def forward(self, Z_v):
        H_v = self.linear_1(Z_v)
        if hasattr(self, "linear_2"):
            H_v = self.linear_2(F.gelu(H_v))        # exact GELU, not the tanh approximation
        return H_v

# ---------------------------------------------------------------- the model


class LLaVA(nn.Module):
    def __init__(self, config: LLaVAConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision, config.vision_feature_layer,
                                            config.vision_feature_select_strategy)       # g
        self.multi_modal_projector = Projector(config.projector_type, config.vision.hidden_size,
                                               config.text.hidden_size)                  # W
        self.language_model = LlamaForCausalLM(config.text)                              # f_phi

    # Loading and saving (implemented in checkpoint.py and saving.py; here so `LLaVA.from_pretrained` reads naturally).
    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None, device=None):
        """A llava-hf folder, a minillava folder, an original LLaVA folder (its config names a hub
        CLIP: pass `vision_tower=` a local CLIP folder) or a stage-1 output folder."""
        from .checkpoint import load_llava
        return load_llava(path, vision_tower=vision_tower, dtype=dtype, device=device)

    @classmethod
    def from_parts(cls, vision, llm, projector_type="mlp2x_gelu", projector=None, dtype=None, device=None, **config):
        """A new LLaVA from a CLIP folder + a LLaMA folder (stage 1 starts here); `projector=` a
        stage-1 output (minillava folder or original `mm_projector.bin`) to load W from."""
        from .checkpoint import build_llava
        return build_llava(vision, llm, projector_type, projector, dtype=dtype, device=device, **config)

    def save_pretrained(self, out_dir, tokenizer_file=None):
        """Write the llava-hf layout (safetensors + config.json) that transformers also loads."""
        from .saving import save_llava
        save_llava(self, out_dir, tokenizer_file)

    def encode_images(self, images):
        """X_v (N_img, 3, H, W) -> H_v (N_img, N_v, D)."""
        vision_dtype = self.vision_tower.vision_model.pre_layrnorm.weight.dtype
        with torch.no_grad():   # CLIP is always frozen: no activations kept, no gradients
            Z_v = self.vision_tower(images.to(vision_dtype))         # (N_img, N_v, D_v)
        return self.multi_modal_projector(Z_v)                       # (N_img, N_v, D)

    def splice(self, input_ids, images=None, labels=None, pad_left=False):
        """Token embeddings with each IMAGE_TOKEN_INDEX replaced by the N_v rows of H_v.

        input_ids: (B, T) or a list of B 1-D tensors of different lengths; at most one image
        placeholder per row; `images` holds one image per placeholder, in row order.
        Returns x (B, L, D), labels (B, L) or None, valid (B, L) bool (False at padding), with
        L = the longest spliced row. Rows are padded on the right (training: causal attention
        never looks right) or on the left (generation: every row's next token is at the end)."""
        embed = self.language_model.model.embed_tokens
        H_v = self.encode_images(images) if images is not None else None
        n_images = 0 if H_v is None else H_v.shape[0]
        rows, row_labels, k = [], [], 0
        for b, ids in enumerate(input_ids):
            x = embed(ids.clamp(min=0))                               # (T, D); -200 looked up as 0, replaced below
            lab = labels[b] if labels is not None else None
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
            if len(where) > 1:
                raise ValueError(f"row {b} has {len(where)} image placeholders; LLaVA takes one image per row")
            if len(where) == 1:
                if k >= n_images:
                    raise ValueError(f"row {b} has an image placeholder but only {n_images} images were given")
                p = where.item()
                x = torch.cat([x[:p], H_v[k].to(x.dtype), x[p + 1:]])   # (T - 1 + N_v, D)
                if lab is not None:
                    lab = torch.cat([lab[:p], lab.new_full((H_v.shape[1],), IGNORE_INDEX), lab[p + 1:]])
                k += 1
            rows.append(x)
            row_labels.append(lab)
        if k != n_images:
            raise ValueError(f"{n_images} images given for {k} image placeholders")
        side = "left" if pad_left else "right"
        valid = pad_sequence([torch.ones(len(r), dtype=torch.bool, device=r.device) for r in rows],
                             batch_first=True, padding_side=side)
        x = pad_sequence(rows, batch_first=True, padding_side=side)      # (B, L, D), zeros at padding
        if labels is not None:
            labels = pad_sequence(row_labels, batch_first=True, padding_value=IGNORE_INDEX, padding_side=side)
        return x, labels, valid

    def forward(self, input_ids, images=None, labels=None):
        """input_ids (B, T) with one -200 per image row, images (N_img, 3, H, W).

        Without labels: logits (B, T - 1 + N_v, V) (rows padded on the right to the longest).
        With labels (B, T) (IGNORE_INDEX where unsupervised): the SUM of the next-token
        cross-entropies over supervised tokens. A sum, so that the training loop can divide by
        the supervised-token count of the whole global batch, however it is split."""
        x, labels, _ = self.splice(input_ids, images, labels)            # (B, L, D)
        h = self.language_model.model(x)                                 # (B, L, D)
        lm_head = self.language_model.lm_head
        if labels is None:
            return lm_head(h)                                            # (B, L, V)
        # Position t predicts token t + 1. Only supervised positions go through lm_head:
        # with V = 32000 the logits of a 2048-token row alone are 65M floats.
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX                                    # (B, L - 1)
        logits = lm_head(h[:, :-1][keep])                                # (N_sup, V)
        return F.cross_entropy(logits.float(), target[keep], reduction="sum")

    # ------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, input_ids, images=None, max_new_tokens=64, temperature=0.0, top_p=1.0,
                 eos_token_id=None, cache=None, streamer=None, generator=None):
        """Sample up to `max_new_tokens` new tokens per row; returns them as (B, <= max_new_tokens),
        each row ending at its `</s>` (kept) and padded with pad_token_id after it.

        temperature 0 is greedy; otherwise softmax(logits / temperature) cut to the smallest set of
        tokens whose probability reaches `top_p`. Prompts of different lengths (a list of 1-D tensors)
        are left-padded. The prompt is run once (prefill), then one token per step through the KV cache.
        `cache`: a KVCache to continue (multi-turn chat); the last returned token is not in it yet.
        `streamer(tokens)` is called with each step's (B,) new tokens."""
        cfg = self.config.text
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        lm = self.language_model
        device = lm.lm_head.weight.device
        rows = [ids.to(device) for ids in input_ids]
        x, _, valid = self.splice(rows, images, pad_left=True)                 # (B, L, D)
        B, L, _ = x.shape
        if cache is None:
            cache = KVCache(cfg, B, L + max_new_tokens, device, x.dtype)
        if cache.length + L + max_new_tokens - 1 > cache.max_len:    # fail now, not half-way through
            raise ValueError(f"prompt ({L} tokens) + {max_new_tokens} new tokens do not fit: the KV cache "
                             f"holds {cache.max_len} positions and {cache.length} are used")
        padded = not bool(valid.all())
        position_ids = None                                                    # None: positions follow the cache
        if padded:
            if cache.length:
                raise ValueError("continuing a cache works for one unpadded row at a time")
            cache.key_mask = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
            cache.key_mask[:, :L] = valid
            position_ids = (valid.cumsum(1) - 1).clamp(min=0)                  # (B, L): padding doesn't count
        h = lm.model(x, position_ids, cache)                                   # prefill
        logits = lm.lm_head(h[:, -1])                                          # (B, V): the last position only
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)              # (B,)
            token = token.masked_fill(done, cfg.pad_token_id)
            out.append(token)
            if streamer is not None:
                streamer(token)
            done |= token == eos
            if done.all() or step == max_new_tokens - 1:
                break
            if position_ids is not None:
                position_ids = position_ids[:, -1:] + 1                        # (B, 1)
            h = lm.model(lm.model.embed_tokens(token[:, None]), position_ids, cache)   # (B, 1, D)
            logits = lm.lm_head(h[:, -1])
        return torch.stack(out, dim=1) if out else torch.empty(B, 0, dtype=torch.long, device=device)


def sample(logits, temperature, top_p, generator=None):
    """logits (B, V) -> next tokens (B,): greedy, or temperature + nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
