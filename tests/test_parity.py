"""minillava computes the same numbers as transformers on tiny random checkpoints (fp32)."""
import pytest
import torch

pytest.importorskip("transformers")

import tiny
from minillava import IMAGE_TOKEN_INDEX, LLaVA
from minillava.checkpoint import build_llava
from minillava.llama import LlamaConfig, LlamaForCausalLM

TOL = 1e-4


def prompt(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, length), generator=g)
    ids[:, 0] = 1                      # BOS
    ids[:, 3] = IMAGE_TOKEN_INDEX      # the image after a few tokens, as in "... USER: <image>\n..."
    return ids


def images(n=2, seed=0):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def test_clip_penultimate_layer_matches_transformers(tmp_path):
    hf = tiny.clip_folder(tmp_path / "clip")
    tiny.llama_folder(tmp_path / "llm")
    model = build_llava(tmp_path / "clip", tmp_path / "llm")
    x = images()
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = model.vision_tower(x)
    assert ours.shape == (2, 16, 32)
    assert tiny.rel_err(ours, ref) < TOL


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_llama_logits_match_transformers(tmp_path, kv_heads):
    hf = tiny.llama_folder(tmp_path / "llm", num_key_value_heads=kv_heads)
    tiny.clip_folder(tmp_path / "clip")
    model = build_llava(tmp_path / "clip", tmp_path / "llm")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert tiny.rel_err(model.language_model(ids), hf(ids).logits) < TOL


def test_llava_hf_sharded_layout_matches_transformers(tmp_path):
    hf = tiny.hf_llava()
    folder = tiny.llava_hf_folder(tmp_path / "llava-hf", hf)
    assert len(list(folder.glob("model-*.safetensors"))) > 1          # really sharded
    model = LLaVA.from_pretrained(folder)
    ids, x = prompt(), images()
    with torch.no_grad():
        ours = model(ids, x)
        ref = hf(input_ids=tiny.hf_image_ids(ids), pixel_values=x).logits
    assert ours.shape == (2, 9 - 1 + 16, 128)
    assert tiny.rel_err(ours, ref) < TOL


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
def test_original_llava_layout_matches_transformers(tmp_path, projector_type):
    hf = tiny.hf_llava(seed=1, linear=projector_type == "linear")
    folder = tiny.original_llava_folder(tmp_path / "llava-v1.5", tmp_path / "clip", hf, projector_type)
    model = LLaVA.from_pretrained(folder, vision_tower=tmp_path / "clip")
    assert model.config.projector_type == projector_type
    ids, x = prompt(seed=1), images(seed=1)
    with torch.no_grad():
        ours = model(ids, x)
        ref = hf(input_ids=tiny.hf_image_ids(ids), pixel_values=x).logits
    assert tiny.rel_err(ours, ref) < TOL


def test_mixed_batch_text_only_row_matches_its_own_forward(tmp_path):
    hf = tiny.hf_llava()
    model = LLaVA.from_pretrained(tiny.llava_hf_folder(tmp_path / "m", hf))
    ids = prompt(batch=2)
    text_row = ids[1].clone()
    text_row[3] = 5                                                   # row 1 has no image
    batch = [ids[0], text_row]
    with torch.no_grad():
        mixed = model(batch, images(n=1))                             # one image for one placeholder
        alone = hf(input_ids=text_row[None]).logits[0]
        with_image = model(ids[:1], images(n=1))[0]
    assert mixed.shape == (2, 9 - 1 + 16, 128)
    assert tiny.rel_err(mixed[1, :9], alone) < TOL                    # right-padded after its 9 tokens
    assert tiny.rel_err(mixed[0], with_image) < TOL


def greedy_without_cache(model, ids, x, n):
    """The slow reference: rerun the whole sequence for every new token."""
    out = ids
    for _ in range(n):
        nxt = model(out, x)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[:, ids.shape[1]:]


def test_greedy_generation_with_cache_matches_transformers_and_no_cache(tmp_path):
    hf = tiny.hf_llava(seed=2)
    model = LLaVA.from_pretrained(tiny.llava_hf_folder(tmp_path / "m", hf))
    ids, x = prompt(batch=1, seed=2), images(n=1, seed=2)
    n = 12
    with torch.no_grad():
        ours = model.generate(ids, x, max_new_tokens=n, temperature=0.0, eos_token_id=-1)
        slow = greedy_without_cache(model, ids, x, n)
        hf_ids = tiny.hf_image_ids(ids)
        ref = hf.generate(input_ids=hf_ids, pixel_values=x, max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, hf_ids.shape[1]:]
    assert ours.tolist() == slow.tolist() == ref.tolist()


def test_batched_generation_of_different_lengths_equals_one_by_one(tmp_path):
    model = LLaVA.from_pretrained(tiny.llava_hf_folder(tmp_path / "m", tiny.hf_llava(seed=3)))
    a, b = prompt(batch=1, length=12, seed=3)[0], prompt(batch=1, length=7, seed=4)[0]
    x = images(n=2, seed=3)
    with torch.no_grad():
        both = model.generate([a, b], x, max_new_tokens=8, eos_token_id=-1)
        one = model.generate([a], x[:1], max_new_tokens=8, eos_token_id=-1)
        two = model.generate([b], x[1:], max_new_tokens=8, eos_token_id=-1)
    assert both.tolist() == [one[0].tolist(), two[0].tolist()]


def test_generation_stops_at_eos_and_pads_after_it(tmp_path):
    model = LLaVA.from_pretrained(tiny.llava_hf_folder(tmp_path / "m", tiny.hf_llava(seed=5)))
    ids, x = prompt(batch=1, seed=5), images(n=1, seed=5)
    free = model.generate(ids, x, max_new_tokens=6, eos_token_id=-1)[0].tolist()
    stop = free[2]                                     # pretend the third token is </s>
    out = model.generate(ids, x, max_new_tokens=6, eos_token_id=stop)[0].tolist()
    assert out == free[:free.index(stop) + 1]


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus():
    from minillava.llava import sample
    logits = torch.tensor([[4.0, 3.0, 0.0, -2.0]])
    draws = {sample(logits, 1.0, 0.5, torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {0}                                # p(0) = 0.71 > 0.5: the nucleus is token 0 alone
    draws = {sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {0, 1}                             # 0.71 + 0.26 >= 0.9
    a = sample(logits, 0.7, 1.0, torch.Generator().manual_seed(7))
    assert a.item() == sample(logits, 0.7, 1.0, torch.Generator().manual_seed(7)).item()


def test_static_kv_cache_decoding_equals_full_forward_for_the_llm():
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**tiny.TEXT})
    lm = LlamaForCausalLM(cfg).eval()
    from minillava.llama import KVCache
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = lm(ids)
        cache = KVCache(cfg, 2, 16, "cpu", torch.float32)
        steps = [lm(ids[:, :6], cache=cache)] + [lm(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
    assert tiny.rel_err(torch.cat(steps, dim=1), full) < TOL
