"""`lowbit demo`: the main job on the bundled SmolLM2, end to end on the CPU."""

from __future__ import annotations

import argparse
import textwrap
import time

import torch

PROMPT = "Explain in two sentences what a Python generator is."
ANSWER_RECIPE = "a16w4-nvfp4"


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 44) -> str:
    lcol = textwrap.wrap(left, width) or [""]
    rcol = textwrap.wrap(right, width) or [""]
    n = max(len(lcol), len(rcol))
    lcol += [""] * (n - len(lcol))
    rcol += [""] * (n - len(rcol))
    lines = [f"{left_title:<{width}}  |  {right_title}", f"{'-' * width}--+--{'-' * width}"]
    lines += [f"{a:<{width}}  |  {b}" for a, b in zip(lcol, rcol)]
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .eval.quality import DEMO_RECIPES, baseline_row, evaluate, format_rows, prepare

    t0 = time.perf_counter()
    recipes = list(args.recipes or DEMO_RECIPES)
    print(f"lowbit demo: {args.model}, recipes {' '.join(recipes)}")
    ev = prepare(args.model, n_tokens=args.tokens, progress=True)
    print(f"model: {ev.bundled.description}")
    print(f"text: {ev.text_source}, {ev.data.numel()} tokens in sequences of {ev.data.shape[1]}")
    rows = [baseline_row(ev)]
    answer_model = None
    for recipe in tqdm(recipes, desc="recipes", unit="recipe"):
        if recipe == ANSWER_RECIPE:
            row, answer_model = evaluate(ev, recipe, return_model=True)
        else:
            row = evaluate(ev, recipe)
        rows.append(row)
    print()
    print("Quality against the full-precision model (all linear layers but lm_head quantized):")
    print(format_rows(rows))
    if ev.bundled.kind == "decoder":
        if answer_model is None:
            _, answer_model = evaluate(ev, ANSWER_RECIPE, return_model=True)
        print(f"\nPrompt: {PROMPT}\n")
        tok = ev.bundled.tokenizer
        print(side_by_side("full precision", answer(ev.bundled.model, tok, PROMPT),
                           ANSWER_RECIPE, answer(answer_model, tok, PROMPT)))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0
