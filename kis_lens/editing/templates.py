"""Context templates and template-averaged keys, as ROME and MEMIT make them.

ROME (``rome_main.get_context_templates``) prefixes each prompt with 20 short texts the model writes itself
from its end-of-text token (``max_out_len`` 5 and 10 counting that token, so 10 texts of 4 new tokens and 10 of 9;
top-5 sampling, ``util/generate.generate_fast``):
``["{}"] + [text + ". {}" ...]`` = 21 templates. Its key k̄ (``compute_u``) is the mean of the 21 keys.

MEMIT (``memit_main.get_context_templates``) writes one 10-token text from each of "The", "Therefore",
"Because", "I", "You" and keeps two groups, ``[["{}"], [five templates]]``; ``compute_ks`` averages the keys
within each group, then across the groups.

Generation is seeded (a ``torch.Generator``), so a run's templates are reproducible and recorded.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.errors import KisError
from kis_lens.facts import Fact
from kis_lens.keys import compute_keys
from kis_lens.models import HookedModel, model_device

# ROME's context_template_length_params for GPT-2 XL / GPT-J: [[length, n_gen], ...]
ROME_TEMPLATE_LENGTHS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
# MEMIT's get_context_templates: five starts, one 10-token generation each
MEMIT_TEMPLATE_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
MEMIT_TEMPLATE_LENGTH = 10
TOP_K = 5

TemplateGroups = Sequence[Sequence[str]]


def _start_token(tokenizer) -> int:
    """Return the token ROME starts its texts from: "<|endoftext|>" where the vocabulary has it, else BOS, else EOS."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(endoftext, int) and endoftext != tokenizer.unk_token_id:
        return endoftext  # GPT-2's document boundary (also SmolLM2's), what ROME's generate_fast is given
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise KisError("the tokenizer has no <|endoftext|>, BOS or EOS token to start ROME's context templates from")
    return int(token)


def generate_fast(
    model: HookedModel,
    prompts: Sequence[list[int]],
    n_gen_per_prompt: int,
    max_out_len: int,
    seed: int = 0,
    top_k: int = TOP_K,
) -> list[str]:
    """Return texts sampled top-k from each token prompt until max_out_len tokens, as ROME's generate_fast."""
    if n_gen_per_prompt < 0 or max_out_len < 1:
        raise KisError(f"need n_gen_per_prompt >= 0 and max_out_len >= 1, got {n_gen_per_prompt}, {max_out_len}")
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    rows = [list(prompt) for prompt in prompts for _ in range(n_gen_per_prompt)]
    with torch.no_grad():
        # rows of one prompt have equal lengths, so each prompt's rows advance together (no padding needed)
        for row in rows:
            while len(row) < max_out_len:
                logits = model(torch.tensor([row], device=device))[0, -1].float().cpu()
                probabilities = torch.softmax(logits, dim=-1)
                top = torch.topk(probabilities, top_k)
                choice = torch.multinomial(top.values / top.values.sum(), 1, generator=generator)
                row.append(int(top.indices[choice]))
    texts = [model.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return [unicodedata.normalize("NFKD", text).replace("\n\n", " ") for text in texts]


def rome_context_templates(
    model: HookedModel, length_params: Sequence[tuple[int, int]] = ROME_TEMPLATE_LENGTHS, seed: int = 0
) -> list[str]:
    """Return ROME's context templates: "{}" and one "<generated text>. {}" per sampled text (21 by default)."""
    start = [_start_token(model.tokenizer)]
    generated: list[str] = []
    for index, (length, n_gen) in enumerate(length_params):
        generated += generate_fast(model, [start], n_gen, length, seed=seed + index)
    # ROME keeps generated braces (a rare "{" would break its own .format); MEMIT replaces them: so do we, both
    return ["{}"] + [text.replace("{", " ").replace("}", " ") + ". {}" for text in generated]


def memit_context_templates(
    model: HookedModel,
    starts: Sequence[str] = MEMIT_TEMPLATE_STARTS,
    length: int = MEMIT_TEMPLATE_LENGTH,
    seed: int = 0,
) -> list[list[str]]:
    """Return MEMIT's template groups: [["{}"], ["<text from 'The'>. {}", ...]] (one text per start)."""
    from kis_lens.tokens import encode

    prompts = [encode(model.tokenizer, start, prepend_bos=False) for start in starts]
    texts = generate_fast(model, prompts, 1, length, seed=seed)
    return [["{}"], [text.replace("{", " ").replace("}", " ") + ". {}" for text in texts]]


def templated_fact(fact: Fact, template: str) -> Fact:
    """Return the fact with its prompt placed in a context template ("x. {}" → "x. In {}, the language is")."""
    return Fact(fact.case_id, fact.subject, template.format(fact.prompt), fact.target_true, fact.target_new)


def flatten_templates(groups: TemplateGroups) -> list[str]:
    """Return the templates of all groups in order (the prompts compute_v/compute_z optimise over)."""
    return [template for group in groups for template in group]


def template_keys(
    model: HookedModel, layer: int, facts: Sequence[Fact], groups: TemplateGroups
) -> Float[Tensor, "fact d_mlp"]:
    """Return each fact's key averaged within each template group, then across groups (MEMIT's compute_ks), float64."""
    if not groups or any(not group for group in groups):
        raise KisError("template groups must be non-empty lists of templates containing '{}'")
    flat = flatten_templates(groups)
    prompts = [templated_fact(fact, template) for fact in facts for template in flat]
    keys = compute_keys(model, prompts, [layer]).at_layer(layer).double().reshape(len(facts), len(flat), -1)
    means, begin = [], 0
    for group in groups:
        means.append(keys[:, begin : begin + len(group)].mean(dim=1))
        begin += len(group)
    return torch.stack(means, dim=1).mean(dim=1)
