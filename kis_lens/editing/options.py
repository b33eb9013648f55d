"""The settings every editing job shares (EditorOptions): the edit layer, the facts edited and watched, the solve.

``kis edit-sim`` (EditSimConfig) and ``kis lifelong`` (LifelongConfig) inherit this block; edit-sim restates the
defaults it runs smaller with. The value search is nested whole: ``value_search`` is a ``ValueSearch`` (ROME's GPT-2
XL hparams by default), which the jobs hand to the editors as it is; its settings' flags are --value_<name>
(kis_lens.blocks.flat_settings).
"""

from __future__ import annotations

from dataclasses import dataclass

from kis_lens.blocks import Override, borrow, setting
from kis_lens.config import CorpusOptions, FactOptions, ModelOptions, RunConfig
from kis_lens.editing.values import ValueSearch


@dataclass(frozen=True)
@borrow(
    FactOptions,
    "facts",
    seed=Override(help="random seed of which facts are edited and watched, in what order, and the context templates"),
)
@borrow(CorpusOptions, "corpus", "max_tokens")
@borrow(RunConfig, "ridge")
class EditorOptions(ModelOptions):
    """The model options, then what every editing job sets: where and how many edits, the editors' solve, C.

    No prepend_bos: the editing jobs follow the model's own BOS convention (and C is cached under it).
    """

    HELP_GROUP = "editing"  # the --help section of its flags (kis_lens.flags)

    layer: int = setting(4, "ROME's edit layer (W_out), and the last of MEMIT's layers")
    n_edits: int | None = setting(None, "facts edited one after another", none="every record", cli_none="all")
    n_unedited: int = setting(64, "how many never-edited facts to watch for drift")
    batch_size: int = setting(16, "facts per MEMIT/AlphaEdit/emmet batch")
    covariance_weight: float | None = setting(
        None, "MEMIT's mom2_update_weight λ on the mean C", none="GPT-J's 15000 per 16384 MLP dims × d_mlp"
    )
    null_threshold: float = setting(2e-2, "AlphaEdit's null space: singular values of C below this")
    null_l2: float = setting(10.0, "AlphaEdit's L2 term α")
    value_search: ValueSearch = setting(
        ValueSearch(), "the value search (ROME's compute_v, MEMIT's compute_z): the target value each edit writes"
    )
