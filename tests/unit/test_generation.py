"""Generation: CFG math, sampling restrictions, image structure."""

import torch

from unitoken.model.generation import (
    cfg_logits,
    decode_image,
    generate_image_codes,
    generate_text,
    sample_token,
)


def test_cfg_scale_one_is_conditional():
    cond, uncond = torch.randn(2, 50), torch.randn(2, 50)
    assert torch.equal(cfg_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(cfg_logits(cond, uncond, 0.0), uncond)


def test_sampling_respects_allowed_and_top_k():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    allowed = torch.tensor([False, True, True, True, True])
    g = torch.Generator().manual_seed(0)
    assert int(sample_token(logits, 0.0, 0, allowed, g)) == 1
    draws = {int(sample_token(logits, 1.0, 2, allowed, g)) for _ in range(200)}
    assert draws == {1, 2}


def test_image_generation_structure_and_decode(tiny):
    """Codes fill the recipe's grid; same seed -> same image; decoded at the recipe resolution."""
    model, _, b = tiny
    a = generate_image_codes(model, b, "a red circle", cfg_scale=3.0, top_k=16, seed=1)
    again = generate_image_codes(model, b, "a red circle", cfg_scale=3.0, top_k=16, seed=1)
    assert a.shape == (8, 8) and torch.equal(a, again)
    assert int(a.min()) >= 0 and int(a.max()) < 256
    img = decode_image(model, a)
    assert img.size == (64, 64) and img.mode == "RGB"


def test_image_generation_cfg_one_matches_manual_greedy(tiny):
    """With cfg 1.0 and greedy decoding, the first code is argmax over image tokens of the
    conditional logits after [BOI][H][W]."""
    model, _, b = tiny
    t = model.tokens
    codes = generate_image_codes(model, b, "x", cfg_scale=1.0, temperature=0.0)
    ids = b.t2i_prompt("x") + [t.boi, *b.grid_ids(8, 8)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]))["logits"][0, -1]
    logits[~t.image_token_mask] = float("-inf")
    assert int(codes[0, 0]) == int(t.token_to_code[int(logits.argmax())])


def test_text_generation_never_emits_image_tokens(tiny):
    model, tok, b = tiny
    from PIL import Image

    answer = generate_text(model, b, "What is this?", [Image.new("RGB", (64, 64), "red")], max_new_tokens=12)
    assert isinstance(answer, str)
    assert "IMGIMG" not in answer and "<reserved" not in answer


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    """Left-padded batches give each prompt the answer and the image it gets alone (greedy text;
    sampled images with per-prompt seeds), so evaluation can batch without changing scores."""
    model, _, b = tiny
    saved = model.lm_head.weight.detach().clone()
    torch.manual_seed(0)
    with torch.no_grad():  # a random model answers "", which would hide padding mistakes
        model.lm_head.weight.normal_(0, 1.0)
    try:
        _check_batched_equals_single(model, b)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)


def _check_batched_equals_single(model, b):
    from PIL import Image

    from unitoken.model.generation import generate_image_codes_batch, generate_text_batch

    prompts = ["a red circle", "two large blue squares in the top left", "x"]
    batch = generate_image_codes_batch(model, b, prompts, cfg_scale=3.0, top_k=16, seeds=[5, 6, 7])
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i], generate_image_codes(model, b, p, cfg_scale=3.0, top_k=16, seed=5 + i))
    images = [[Image.new("RGB", (64, 64), c)] for c in ("red", "blue", "green")]
    questions = ["What is this?", "What color is the object in the top left corner of the image?", "Count."]
    answers = generate_text_batch(model, b, questions, images, max_new_tokens=6)
    assert answers == [generate_text(model, b, q, im, max_new_tokens=6) for q, im in zip(questions, images)]
    assert any(answers)


def test_generate_takes_sampling_defaults_from_the_models_recipe(tiny, tmp_path, monkeypatch):
    """`unitoken generate` without --cfg/--top-k uses the recipe the model directory names (config.json, or a
    hand-off's handoff.json): the paper's CFG 5.5 and image top-k 4000 for unitoken-7b, 3.0 and 0 for tiny; the
    command line wins. (The tiny model stands in for a 7B one: only the recorded recipe name is read.)"""
    import json

    import unitoken.model.generation as generation
    from unitoken.cli import main
    from unitoken.model.io import save_model

    seen = []

    def fake(model, builder, prompt, cfg_scale, temperature, top_k, seed, progress):
        seen.append((cfg_scale, top_k))
        return torch.zeros(model.config.vq.codes_per_side, model.config.vq.codes_per_side, dtype=torch.long)

    monkeypatch.setattr(generation, "generate_image_codes", fake)
    model, tok, _ = tiny
    m = save_model(model, tok, tmp_path / "m", recipe="tiny")

    def generate(*extra):
        assert main(["--debug", "generate", "--model", str(m), "--prompt", "a red circle", "--out",
                     str(tmp_path / "g.png"), "--device", "cpu", *extra]) == 0
        return seen[-1]

    assert generate() == (3.0, 0)
    doc = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps(dict(doc, recipe="unitoken-7b")))
    assert generate() == (5.5, 4000)
    assert generate("--cfg", "5.0") == (5.0, 4000)
    assert generate("--cfg", "2", "--top-k", "7") == (2.0, 7)
    (m / "config.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "recipe"}))
    (m / "handoff.json").write_text(json.dumps({"recipe": "unitoken-7b-anyres"}))  # a hand-off before config.json named it
    assert generate() == (5.5, 4000)
    (m / "handoff.json").unlink()
    assert generate() == (3.0, 0)  # names no recipe: the former defaults
