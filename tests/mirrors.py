"""Reference mirrors of the original editors, written from the authors' code, on a TransformerLens model.

Read from (newest stored snapshots):
- kmeng01/rome 0874014 (2022-10-14): rome/compute_u.py, rome/compute_v.py, rome/rome_main.py, rome/repr_tools.py
- kmeng01/memit 80426fd (2022-11-14): memit/memit_main.py, memit/compute_z.py, memit/compute_ks.py
- jianghoucheng/AlphaEdit f5248d3 (2024-10-17): AlphaEdit/AlphaEdit_main.py, AlphaEdit/compute_z.py,
  AlphaEdit/compute_ks.py, experiments/evaluate.py (get_project)

Each function keeps the original's structure and its loops (one forward per prompt where the original
batches padded prompts: the rows do not interact, so only the padding differs). nethook module names become
hooks: the input of ``rewrite_module_tmp`` (c_proj / down_proj) is ``blocks.{L}.mlp.hook_post``, its output
(= ``mlp_module_tmp``'s output) ``blocks.{L}.hook_mlp_out``, the output of ``layer_module_tmp``
``blocks.{L}.hook_resid_post``. Weights are in TransformerLens orientation [d_mlp, d_model], i.e. the
transpose of the originals' ``upd_matrix`` for nn.Linear (``upd_matrix_match_shape``).

What the originals generate or load is an argument here: the context templates (ROME: a flat list starting
with "{}"; MEMIT/AlphaEdit: groups starting with ["{}"]) and C (``stat.mom2.moment()``, the mean k kᵀ).
Subjects are located with kis_lens.keys.locate_subject (the originals use repr_tools.get_words_idxs_in_templates,
which counts prefix/subject tokens; it agrees on these prompts).

Dtypes: the originals run everything in the model's dtype (float32) and MEMIT's solve in double; the tests
run the model in float64, so everything here is float64 except δ, which the originals create with
``torch.zeros(...)`` in the default dtype (float32), and which stays float32 here too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from kis_lens.facts import Fact
from kis_lens.keys import locate_subject
from kis_lens.models import resolve_prepend_bos
from kis_lens.tokens import encode
from kis_lens.w_out import output_weight

MLP_IN = "blocks.{}.mlp.hook_post"  # input of rewrite_module_tmp ("transformer.h.{}.mlp.c_proj")
MLP_OUT = "blocks.{}.hook_mlp_out"  # output of rewrite_module_tmp / mlp_module_tmp ("transformer.h.{}.mlp")
RESID = "blocks.{}.hook_resid_post"  # output of layer_module_tmp ("transformer.h.{}")


@dataclass(frozen=True)
class Hparams:
    """The hparams compute_v / compute_z read (ROME GPT-2 XL defaults; MEMIT uses clamp_norm_factor 0.75)."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0


# ---------------------------------------------------------------------------------------------------------
# Tokens and one forward per prompt (repr_tools.get_reprs_at_word_tokens, find_fact_lookup_idx)
# ---------------------------------------------------------------------------------------------------------


def _located(model: Any, fact: Fact, template: str):
    """Return (ids, subject_last) of template.format(fact.prompt) with the subject filled in."""
    prompt = Fact(fact.case_id, fact.subject, template.format(fact.prompt), fact.target_true)
    located = locate_subject(model.tokenizer, prompt, resolve_prepend_bos(model, None))
    return located.ids, located.subject_last


def _forward(model: Any, ids: Sequence[int], hooks: list) -> Tensor:
    tokens = torch.tensor([list(ids)], device=next(model.parameters()).device)
    with model.hooks(fwd_hooks=hooks):
        return model(tokens)


def repr_at_subject(model: Any, fact: Fact, template: str, hook_name: str) -> Tensor:
    """Return the activation at hook_name at the subject's last token of template(prompt) (no grad)."""
    ids, idx = _located(model, fact, template)
    kept: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> Tensor:
        kept["row"] = activation[0, idx].detach().clone()
        return activation

    with torch.no_grad():
        _forward(model, ids, [(hook_name, keep)])
    return kept["row"]


@contextlib.contextmanager
def _no_param_grads(model: Any) -> Iterator[None]:
    """nethook.set_requires_grad(False, model), restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------------
# The shared optimisation of compute_v (ROME) and compute_z (MEMIT / AlphaEdit)
# ---------------------------------------------------------------------------------------------------------


def value_search(
    model: Any, fact: Fact, layer: int, templates: Sequence[str], hp: Hparams, site: str
) -> tuple[Tensor, Tensor, int]:
    """The loop of rome/compute_v.py (site MLP_OUT) and memit/compute_z.py (site RESID).

    Returns (target_init, δ, loop iterations run); the originals return target = target_init + δ.
    """
    tok = model.tokenizer
    # target_ids = tok(" " + target_new)["input_ids"] (execute_rome / execute_memit prepend the space)
    target_ids = encode(tok, " " + fact.target_new.strip(), prepend_bos=False)
    # Rewriting prompts: the original builds `context.format(prompt) + tok.decode(target_ids[:-1])` and
    # re-tokenises the string; kis_lens concatenates the ids (no merge at the seam), and so does this mirror.
    rewriting = []
    for context in templates:
        ids, idx = _located(model, fact, context)
        rewriting.append(([*ids, *target_ids[:-1]], idx, len(ids)))
    kl_ids, kl_idx = _located(model, Fact(fact.case_id, fact.subject, "{} is a", fact.target_true), "{}")
    all_prompts = [*((ids, idx) for ids, idx, _ in rewriting), (kl_ids, kl_idx)]  # rewriting + ["{} is a"]

    n_layers = int(model.cfg.n_layers)
    loss_layer = n_layers - 1  # max(v_loss_layer, layer) with v_loss_layer = the last layer (47 for GPT-2 XL)
    site_name = site.format(layer)

    delta = torch.zeros(int(model.cfg.d_model), requires_grad=True)  # float32, as torch.zeros(...) there
    target_init: Tensor | None = None
    kl_distr_init: Tensor | None = None

    def edit_output_fn(lookup_idx: int, first: bool):
        def hook(cur_out: Tensor, hook: Any) -> Tensor:
            nonlocal target_init
            if target_init is None and first:
                # "Initial value is recorded for the clean sentence": row 0 = the "{}" template
                target_init = cur_out[0, lookup_idx].detach().clone()
            cur_out = cur_out.clone()
            cur_out[0, lookup_idx, :] += delta.to(cur_out.dtype)
            return cur_out

        return hook

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    with _no_param_grads(model):
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            # Forward propagation, one prompt at a time (the original pads all prompts into one batch)
            outs = []
            for row, (ids, idx) in enumerate(all_prompts):
                kept: dict[str, Tensor] = {}

                def keep(activation: Tensor, hook: Any, kept: dict = kept) -> Tensor:
                    kept["resid"] = activation
                    return activation

                hooks = [(site_name, edit_output_fn(idx, row == 0))]
                if site == RESID:
                    hooks.append((RESID.format(loss_layer), keep))
                logits = _forward(model, ids, hooks)
                outs.append((logits, kept.get("resid")))

            # Compute distribution for KL divergence (the subject's last token of "{} is a")
            kl_logits = outs[-1][0][0, kl_idx][None]
            kl_log_probs = torch.nn.functional.log_softmax(kl_logits, dim=1)
            if kl_distr_init is None:
                kl_distr_init = kl_log_probs.detach().clone()

            # Compute loss on rewriting targets: position len(prompt) - 1 + j predicts target_ids[j]
            nll_each = []
            for (logits, resid), (_, _, n_prompt) in zip(outs[:-1], rewriting):
                if site == RESID:
                    # compute_z: log_softmax(ln_f(full_repr) @ lm_w + lm_b) at loss_layer's output
                    log_probs = torch.log_softmax(model.unembed(model.ln_final(resid)), dim=2)[0]
                else:
                    log_probs = torch.log_softmax(logits, dim=2)[0]
                picked = [log_probs[n_prompt - 1 + j, t] for j, t in enumerate(target_ids)]
                nll_each.append(-torch.stack(picked).sum() / len(target_ids))
            nll_loss = torch.stack(nll_each).mean()
            kl_loss = hp.kl_factor * torch.nn.functional.kl_div(
                kl_distr_init, kl_log_probs, log_target=True, reduction="batchmean"
            )
            weight_decay = hp.v_weight_decay * (torch.norm(delta) / torch.norm(target_init) ** 2)
            loss = nll_loss + kl_loss + weight_decay
            if loss < 5e-2:
                break
            if it == hp.v_num_grad_steps - 1:
                break

            loss.backward()
            opt.step()

            # Project within L2 ball
            max_norm = hp.clamp_norm_factor * target_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()

    return target_init, delta.detach(), it + 1


# ---------------------------------------------------------------------------------------------------------
# ROME: compute_u, compute_v, execute_rome (+ the r-ROME / p-ROME key choices)
# ---------------------------------------------------------------------------------------------------------


def compute_u(model: Any, fact: Fact, layer: int, context_templates: Sequence[str], cov: Tensor) -> Tensor:
    """rome/compute_u.py (fact_token "subject_last", mom2_adjustment): C⁻¹ k̄ / ‖C⁻¹ k̄‖."""
    cur_repr = torch.stack([repr_at_subject(model, fact, t, MLP_IN.format(layer)) for t in context_templates]).mean(0)
    u = torch.inverse(cov.double()) @ cur_repr.double().unsqueeze(1)  # get_inv_cov: torch.inverse(mom2)
    u = u.squeeze()
    return u / u.norm()


def compute_v(
    model: Any,
    fact: Fact,
    layer: int,
    left_vector: Tensor,
    context_templates: Sequence[str],
    hp: Hparams = Hparams(),
    scale_templates: Sequence[str] = ("{}",),
) -> tuple[Tensor, Tensor]:
    """rome/compute_v.py: v* at the MLP output, then right = (v* − cur_output) / (cur_input · u); returns (right, v*).

    The original reads cur_input / cur_output at the plain prompt (``context_template=request["prompt"]``):
    scale_templates=("{}",). r-ROME averages them over the context templates (the output is affine in the
    input, so its mean is W k̄ + b).
    """
    target_init, delta, _ = value_search(model, fact, layer, context_templates, hp, MLP_OUT)
    target = target_init + delta
    cur_input = torch.stack([repr_at_subject(model, fact, t, MLP_IN.format(layer)) for t in scale_templates]).mean(0)
    cur_output = torch.stack([repr_at_subject(model, fact, t, MLP_OUT.format(layer)) for t in scale_templates]).mean(0)
    right_vector = (target - cur_output) / torch.dot(cur_input.double(), left_vector.double())
    return right_vector, target


ROME_VARIANTS = {  # (keys of compute_u's direction, keys of compute_v's scale/residual)
    "rome": ("templates", "plain"),
    "r-rome": ("templates", "templates"),
    "p-rome": ("plain", "plain"),
}


def execute_rome(
    model: Any,
    fact: Fact,
    layer: int,
    context_templates: Sequence[str],
    cov: Tensor,
    hp: Hparams = Hparams(),
    variant: str = "rome",
) -> Tensor:
    """rome_main.execute_rome + apply_rome_to_model for one layer: ΔW = u rightᵀ, added to W_out; returns ΔW."""
    direction, scale = ROME_VARIANTS[variant]
    pick = {"templates": list(context_templates), "plain": ["{}"]}
    left_vector = compute_u(model, fact, layer, pick[direction], cov)
    right_vector, _ = compute_v(model, fact, layer, left_vector, context_templates, hp, pick[scale])
    upd_matrix = left_vector.unsqueeze(1) @ right_vector.unsqueeze(0)  # [d_mlp, d_model]: TL's orientation
    handle = output_weight(model, layer)
    handle.write(handle.read() + upd_matrix)  # w[...] += upd_matrix
    return upd_matrix


# ---------------------------------------------------------------------------------------------------------
# MEMIT: compute_z, compute_ks, execute_memit
# ---------------------------------------------------------------------------------------------------------


def compute_z(model: Any, fact: Fact, layer: int, context_templates: Sequence[Sequence[str]], hp: Hparams) -> Tensor:
    """memit/compute_z.py: target_init + δ at the residual output of `layer` (context templates flattened)."""
    flat = [context for context_types in context_templates for context in context_types]
    target_init, delta, _ = value_search(model, fact, layer, flat, hp, RESID)
    return target_init + delta


def compute_ks(model: Any, facts: Sequence[Fact], layer: int, context_templates: Sequence[Sequence[str]]) -> Tensor:
    """memit/compute_ks.py: each fact's key averaged within each template group, then across the groups."""
    ans = []
    for fact in facts:
        tmp = []
        for context_type in context_templates:
            keys = [repr_at_subject(model, fact, context, MLP_IN.format(layer)) for context in context_type]
            tmp.append(torch.stack(keys).mean(0))
        ans.append(torch.stack(tmp, 0).mean(0))
    return torch.stack(ans, dim=0)


def _zs(
    model: Any,
    facts: Sequence[Fact],
    z_layer: int,
    context_templates: Sequence[Sequence[str]],
    hp: Hparams,
    z_cache: dict[str, Tensor] | None,
) -> Tensor:
    """The z loop of execute_memit / apply_AlphaEdit_to_model: [d_model, n].

    z_cache stands for their ``cache_template`` files (v_star per case_id, loaded when present, else computed
    and saved); the tests reuse it only where the model is in the same state.
    """
    z_list = []
    for fact in facts:
        if z_cache is not None and fact.case_id in z_cache:
            z_list.append(z_cache[fact.case_id])
            continue
        cur_z = compute_z(model, fact, z_layer, context_templates, hp)
        z_list.append(cur_z)
        if z_cache is not None:
            z_cache[fact.case_id] = cur_z
    return torch.stack(z_list, dim=1)


def _cur_zs(model: Any, facts: Sequence[Fact], z_layer: int) -> Tensor:
    """get_module_input_output_at_words(..., z_layer, [request["prompt"]], layer_module_tmp)[1].T: [d_model, n]."""
    return torch.stack([repr_at_subject(model, fact, "{}", RESID.format(z_layer)) for fact in facts], dim=1)


def execute_memit(
    model: Any,
    facts: Sequence[Fact],
    layers: Sequence[int],
    context_templates: Sequence[Sequence[str]],
    covs: dict[int, Tensor],
    mom2_update_weight: float,
    hp: Hparams = Hparams(clamp_norm_factor=0.75),
    spread_residual: bool = True,
    z_cache: dict[str, Tensor] | None = None,
) -> dict[int, Tensor]:
    """memit_main.execute_memit; the weights are left edited (= its restore + apply_memit_to_model's add).

    spread_residual=False drops ``/ (len(layers) - i)``: a wrong variant for the swap test.
    """
    weights_copy = {layer: output_weight(model, layer).read() for layer in layers}
    z_layer = layers[-1]
    zs = _zs(model, facts, z_layer, context_templates, hp, z_cache)
    deltas = {}
    for i, layer in enumerate(layers):
        layer_ks = compute_ks(model, facts, layer, context_templates).T
        cur_zs = _cur_zs(model, facts, z_layer)
        targets = zs - cur_zs
        layer_ks, targets = layer_ks.double(), targets.double()  # "Compute update in double precision"
        adj_k = torch.linalg.solve(mom2_update_weight * covs[layer].double() + layer_ks @ layer_ks.T, layer_ks)
        resid = targets / (len(layers) - i) if spread_residual else targets  # Distribute residual across layers
        upd_matrix = resid @ adj_k.T  # [d_model, d_mlp], the nn.Linear orientation
        output_weight(model, layer).write(weights_copy[layer] + upd_matrix.T)  # weights_copy + upd_matrix
        deltas[layer] = upd_matrix.T
    return deltas


# ---------------------------------------------------------------------------------------------------------
# AlphaEdit: get_project (experiments/evaluate.py), apply_AlphaEdit_to_model with cache_c
# ---------------------------------------------------------------------------------------------------------


def get_project(cov: Tensor, nullspace_threshold: float, relative: bool = False) -> Tensor:
    """experiments/evaluate.py:get_project: U₀U₀ᵀ over C's singular vectors with S < threshold (absolute).

    relative=True (S < threshold · S.max()) is not AlphaEdit's: a wrong variant for the swap test.
    """
    U, S, _ = torch.linalg.svd(cov.double(), full_matrices=False)
    threshold = nullspace_threshold * S.max() if relative else nullspace_threshold
    small_singular_indices = (S < threshold).nonzero(as_tuple=True)[0]
    return U[:, small_singular_indices] @ U[:, small_singular_indices].T


def apply_alphaedit(
    model: Any,
    facts: Sequence[Fact],
    layers: Sequence[int],
    context_templates: Sequence[Sequence[str]],
    P: Tensor,
    cache_c: Tensor,
    L2: float,
    hp: Hparams = Hparams(clamp_norm_factor=0.75),
    accumulate_cache: bool = True,
    z_cache: dict[str, Tensor] | None = None,
) -> tuple[dict[int, Tensor], Tensor]:
    """AlphaEdit_main.apply_AlphaEdit_to_model: P, cache_c are [len(layers), d_mlp, d_mlp]; returns (ΔW, cache_c).

    The original solves in float32 (L2·eye in torch.float); the model here is float64, so is the solve.
    accumulate_cache=False skips the cache_c update: a wrong variant for the swap test.
    """
    z_layer = layers[-1]
    zs = _zs(model, facts, z_layer, context_templates, hp, z_cache)
    deltas = {}
    for i, layer in enumerate(layers):
        layer_ks = compute_ks(model, facts, layer, context_templates).T
        cur_zs = _cur_zs(model, facts, z_layer)
        targets = zs - cur_zs
        resid = targets / (len(layers) - i)  # Distribute residual across layers
        eye = torch.eye(layer_ks.shape[0], dtype=layer_ks.dtype)
        upd_matrix = torch.linalg.solve(
            P[i] @ (layer_ks @ layer_ks.T + cache_c[i]) + L2 * eye, P[i] @ layer_ks @ resid.T
        )  # [d_mlp, d_model]: TL's orientation already
        handle = output_weight(model, layer)
        handle.write(handle.read() + upd_matrix)  # weights[...] = weights + upd_matrix
        deltas[layer] = upd_matrix
    if accumulate_cache:
        cache_c = cache_c.clone()
        for i, layer in enumerate(layers):  # keys of this batch, on the edited model
            layer_ks = compute_ks(model, facts, layer, context_templates).T
            cache_c[i] += layer_ks @ layer_ks.T
    return deltas, cache_c
