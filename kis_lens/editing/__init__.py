"""Closed-form edits of a layer's MLP output weight W_out (ROME, MEMIT, AlphaEdit) and the lifelong-editing simulation.

- ``weights``:  apply / restore ΔW (``apply_delta``, ``applied_delta``; W_out's accessor is
  kis_lens.w_out.output_weight)
- ``editors``:  ROME, MEMIT and AlphaEdit deltas, C⁻¹ solves, whitened-orthogonal keys
- ``values``:   the one value search (``compute_target``: ROME's compute_v, MEMIT's compute_z), target log-probs
- ``simulation``: the patched-output edit simulation (``EditSimConfig``, ``run_edit_simulation``)
- ``registry``: the editors by name; ``api``: ``kl.edit``, a few edits in EasyEdit's terms
- ``lifelong``: the real sequential run (``kis lifelong``; its parts in ``lifelong_*``, a study in ``study_*``)
- ``metrics``:  summary numbers; ``simulation_plots`` / ``lifelong_plots``: figures (the README's Layout lists all)

>>> from kis_lens.editing.editors import rome_delta   # each name from the module that defines it
"""
