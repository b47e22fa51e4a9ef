"""Conditioning tokens from acquisition metadata: one learned token per field.

Each sample's `meta` dict (the shard's meta.json) gives six fields. Each field has a fixed
vocabulary; index 0 of every field is a learned "unknown" embedding, used for a value never seen
in the vocabulary, a missing key, None or "". So an unseen vendor or a new field strength still
runs (CMRxRecon2025 TaskR1/TaskS1 test on centres, vendors and a 5 T scanner absent from training).

The vocabularies are part of the checkpoint format: only ever APPEND to them, or the embeddings of
a trained model change meaning. Strings are matched case-insensitively.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCABULARIES: dict[str, tuple[str, ...]] = {
    # 2025 modality folders, the 2024 extras, and fastMRI anatomies
    "modality": ("cine", "lge", "mapping", "t1rho", "t1w", "t2w", "blackblood", "flow2d", "perfusion",
                 "aorta", "tagging", "t1map", "t2map", "t1mappost", "t2smap", "knee", "brain"),
    "view": ("sax", "lax", "lax_2ch", "lax_3ch", "lax_4ch", "lax_r2ch", "lvot", "rvot", "ot",
             "aorta_sag", "aorta_tra", "tra", "sag", "cor"),
    "pattern": ("uniform", "ktgaussian", "ktradial", "ktuniform", "random", "equispaced", "full"),
    "R": ("1", "2", "4", "6", "8", "10", "12", "16", "20", "24"),
    "vendor": ("siemens", "uih", "philips", "ge"),
    "field_T": ("0.55", "1.5", "3", "5", "7"),
}
FIELDS: tuple[str, ...] = tuple(VOCABULARIES)


def _token(field: str, value: Any) -> str:
    """Canonical vocabulary spelling of one metadata value ("" for missing)."""
    if value is None or isinstance(value, bool):
        return ""
    if field == "R":
        try:
            return str(int(value))
        except (TypeError, ValueError):
            return ""
    if field == "field_T":
        try:
            return f"{round(float(value), 2):g}"  # 3.0 -> "3", 0.55 -> "0.55"
        except (TypeError, ValueError):
            return ""
    return str(value).strip().lower()


def vocabulary_index(field: str, value: Any) -> int:
    """Row of `value` in `field`'s table: 1 + its vocabulary position, or 0 (unknown)."""
    vocab = VOCABULARIES[field]
    token = _token(field, value)
    return vocab.index(token) + 1 if token in vocab else 0


class Conditioning(nn.Module):
    """meta: list[dict] (B) -> conditioning tokens (B, len(FIELDS), dim), one per field.

    All fields share one parameter table with per-field row offsets; row `offset[f]` is field f's
    "unknown" embedding. Initialised like ViT position embeddings (std 0.02) in this module's own
    __init__, so the values survive deepspeed.zero.Init.
    """

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        sizes = [len(VOCABULARIES[f]) + 1 for f in FIELDS]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.table = nn.Parameter(torch.empty(sum(sizes), dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.table, std=0.02)

    def indices(self, meta: list[dict]) -> torch.Tensor:
        """Table rows for a batch: long (B, len(FIELDS))."""
        rows = [[off + vocabulary_index(f, m.get(f)) for f, off in zip(FIELDS, self.offsets)] for m in meta]
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, meta: list[dict]) -> torch.Tensor:
        """meta: B dicts -> (B, len(FIELDS), dim) in the table's dtype."""
        return self.table[self.indices(meta).to(self.table.device)]
