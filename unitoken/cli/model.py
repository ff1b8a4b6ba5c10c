"""``unitoken model init|summary``, ``tokenizer train``, ``generate``, ``chat``: make a model and use it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from unitoken.cli.common import (
    Group,
    add_overrides,
    command,
    console,
    count_table,
    device,
    err_console,
    progress,
)

RECIPES = "tiny | small | unitoken-7b | unitoken-7b-anyres | unitoken-7b-fast"


def register(sub) -> None:
    model = Group(sub, "model", "create and inspect models")
    init = model.command("init", "a model from a recipe (random, trained VQ tokenizer, released weights)",
                         ["unitoken model init --recipe tiny --out m",
                          "unitoken model init --recipe unitoken-7b --out m7 --pretrained /models/Lumina-mGPT-7B-512 "
                          "/models/siglip-so400m-patch14-384 /models/chameleon/tokenizer"], cmd_model_init)
    init.add_argument("--recipe", required=True, help=RECIPES)
    init.add_argument("--out", required=True, type=Path, help="model directory to write (hand-off format)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", type=Path, help="VQ-GAN directory (vqgan.yaml + vqgan.ckpt) to use")
    init.add_argument("--pretrained", type=Path, nargs="+", default=[],
                      help="released weights: Lumina-mGPT/Chameleon HF dir, SigLIP HF dir, VQ-GAN dir")
    add_overrides(init, "recipe override, e.g. --set model.encoder_mode=discrete")
    summary = model.command("summary", "parameter counts of a recipe, built on the meta device",
                            ["unitoken model summary --recipe unitoken-7b"], cmd_model_summary)
    summary.add_argument("--recipe", required=True, help=RECIPES)
    add_overrides(summary)
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tokenizer = Group(sub, "tokenizer", "train a VQ tokenizer where no released one fits")
    tt = tokenizer.command("train", "train the recipe's VQ-GAN on a data set's images",
                           ["unitoken tokenizer train --data d --out vq --recipe tiny"], cmd_tokenizer_train)
    tt.add_argument("--data", required=True, type=Path, help="data dir (manifest.jsonl) or a manifest")
    tt.add_argument("--out", required=True, type=Path)
    tt.add_argument("--recipe", default="tiny")
    tt.add_argument("--steps", type=int, default=2000)
    tt.add_argument("--batch-size", type=int, default=32)
    tt.add_argument("--lr", type=float, default=1e-3)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--device", default="auto")
    add_overrides(tt)
    _register_sampling(sub)


def _register_sampling(sub) -> None:
    gen = command(sub, "generate", "text-to-image",
                  ['unitoken generate --model m --prompt "a red circle" --out g.png',
                   'unitoken generate --model models:/shapes@champion --prompt "two blue squares" --out g.png '
                   "--cfg 3.0 --top-k 0 --seed 1"], cmd_generate)
    gen.add_argument("--model", required=True, help="model directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, type=Path, help="PNG to write")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1.0 = off (default: the model's "
                     "recipe's: 5.5 for unitoken-7b*, 3.0 for small and tiny)")
    gen.add_argument("--top-k", type=int, help="sample among the k best image tokens, 0 = all (default: the model's "
                     "recipe's: 4000 for unitoken-7b*, 0 for small and tiny)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda")

    chat = command(sub, "chat", "answer a question about images",
                   ['unitoken chat --model m --image g.png --prompt "What is this?"'], cmd_chat)
    chat.add_argument("--model", required=True, help="model directory")
    chat.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--prompt", required=True)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's setting)")
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--device", default="auto")


# --------------------------------------------------------------------------- handlers


def cmd_model_init(args) -> int:
    from unitoken.model.io import detect_format, init_model, save_model
    from unitoken.recipes import get_recipe

    recipe = get_recipe(args.recipe, args.overrides)
    pretrained = list(args.pretrained)
    if args.tokenizer:
        if detect_format(args.tokenizer) != "vqgan":
            raise ValueError(f"--tokenizer {args.tokenizer}: expected a VQ-GAN directory (vqgan.yaml + vqgan.ckpt)")
        pretrained.append(args.tokenizer)
    with console.status(f"building {recipe.name} model"):
        model, tokenizer = init_model(recipe.model, pretrained, seed=args.seed)
        save_model(model, tokenizer, args.out, recipe=recipe.name)
    console.print(count_table(f"{recipe.name} -> {args.out}", "module", model.num_parameters(), "parameters"))
    return 0


def cmd_model_summary(args) -> int:
    import torch

    from unitoken.model.tokens import build_tokenizer
    from unitoken.model.unitoken import UniToken
    from unitoken.recipes import get_recipe

    recipe = get_recipe(args.recipe, args.overrides)
    cfg = recipe.model
    tokenizer = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = UniToken(cfg, tokenizer.get_vocab())
    counts = model.num_parameters()
    if args.json:
        print(json.dumps({"recipe": recipe.name, "parameters": counts}))
    else:
        console.print(count_table(f"{recipe.name} ({recipe.description})", "module", counts, "parameters"))
    return 0


def cmd_tokenizer_train(args) -> int:
    from unitoken.data.tokenizer_train import train_tokenizer
    from unitoken.recipes import get_recipe

    cfg = get_recipe(args.recipe, args.overrides).model.vq
    bar, update = progress("training VQ-GAN")
    with bar:
        report = train_tokenizer(args.data, args.out, cfg, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed, device=args.device,
                                 progress=lambda done, total, loss: update(done, total))
    table = Table(title=f"VQ tokenizer -> {args.out}")
    keys = ("steps", "train_seconds", "psnr_db", "codebook_used", "codebook_usage", "recognition_rate")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    table.add_row(*[str(report.get(k)) for k in keys])
    console.print(table)
    return 0


def cmd_generate(args) -> int:
    from rich.progress import Progress

    from unitoken.model.generation import decode_image, generate_image_codes
    from unitoken.model.io import load_model
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.recipes import sampling_defaults
    from unitoken.registry import model_dir

    path = model_dir(args.model)
    model, tokenizer = load_model(path, device=device(args.device))
    builder = SequenceBuilder(model.tokens, tokenizer, model.config)
    sampling, source = sampling_defaults(path)
    cfg = sampling.cfg if args.cfg is None else args.cfg
    top_k = sampling.top_k if args.top_k is None else args.top_k
    if args.cfg is None or args.top_k is None:
        err_console.print(f"sampling: CFG {cfg}, image top-k {top_k} (from the {source})", highlight=False)
    start = time.perf_counter()
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("generating rows", total=model.config.vq.codes_per_side)
        codes = generate_image_codes(model, builder, args.prompt, cfg_scale=cfg, temperature=args.temperature,
                                     top_k=top_k, seed=args.seed,
                                     progress=lambda done, total: bar.update(task, completed=done))
    image = decode_image(model, codes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    console.print(f"wrote {args.out} ({image.width}x{image.height}, {codes.numel()} VQ ids, "
                  f"{time.perf_counter() - start:.1f}s)")
    return 0


def cmd_chat(args) -> int:
    from PIL import Image

    from unitoken.model.generation import generate_text
    from unitoken.model.io import load_model
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.registry import model_dir

    images = []
    for path in args.image:
        if not path.is_file():
            raise FileNotFoundError(f"--image {path}: no such file")
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    model, tokenizer = load_model(model_dir(args.model), device=device(args.device))
    builder = SequenceBuilder(model.tokens, tokenizer, model.config)
    answer = generate_text(model, builder, args.prompt, images, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed)
    print(answer)
    return 0
