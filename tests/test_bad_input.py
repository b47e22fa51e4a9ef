"""Bad input during conversion (issue 3 §7): each bad file gives a manifest error naming the file and
the problem while the rest converts; a failing run damages nothing already written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from shards.convert import ConvertConfig, ShardSink, convert
from shards.layout import LayoutError
from shards.manifest import MANIFEST_NAME, Manifest
from shards.matfile import write_mat73

SCANNER = ("Center005", "Siemens_30T_Vida")


def _cfg(root: Path, out: Path, **kw) -> ConvertConfig:
    return ConvertConfig(input=str(root), out=str(out), **{"shard_samples": 2, "progress": False, "workers": 1, **kw})


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_bad_files_become_manifest_errors_and_the_rest_converts(tree, tmp_path: Path) -> None:
    good = tree.train_file("Cine", *SCANNER, "P001", "cine_sax", tree.kspace(nz=3))
    bad: dict[str, str] = {}
    # truncated v7.3: header and the start of the HDF5 body only
    p = tree.train_file("Cine", *SCANNER, "P002", "cine_sax", tree.kspace())
    p.write_bytes(p.read_bytes()[:1500])
    bad[p.name + "@P002"] = "truncated or corrupt"
    # an HDF5 (v7.3) file with two variables, and one with none
    p = tree.train_file("Cine", *SCANNER, "P003", "cine_sax", tree.kspace())
    with h5py.File(p, "r+") as fh:
        fh["kspace2"] = np.zeros(3)
    bad[p.name + "@P003"] = "2 variables"
    p = tree.train_file("Cine", *SCANNER, "P004", "cine_sax", tree.kspace())
    with h5py.File(p, "r+") as fh:
        del fh["kspace"]
    bad[p.name + "@P004"] = "no variable"
    # wrong rank (3-D k-space)
    tree.write(f"{tree.TRAIN.format(mod='Cine')}/FullSample/{SCANNER[0]}/{SCANNER[1]}/P005/cine_sax.mat", "kspace",
               tree.kspace()[0, 0])
    bad["cine_sax.mat@P005"] = "rank 3"
    # NaN and Inf
    k = tree.kspace()
    k[1, 0, 0, 3, 4] = np.nan
    k[0, 1, 2, 5, 6] = np.inf
    tree.train_file("Cine", *SCANNER, "P006", "cine_sax", k)
    bad["cine_sax.mat@P006"] = "2 non-finite"
    # v5 file with an unexpected variable name
    tree.train_file("T1w", *SCANNER, "P007", "T1w", tree.kspace()[0], v5=True)
    v5 = tree.root / tree.TRAIN.format(mod="T1w") / f"FullSample/{SCANNER[0]}/{SCANNER[1]}/P007/T1w.mat"
    from shards.matfile import write_mat5

    write_mat5(v5, "image", tree.kspace()[0])
    bad["T1w.mat@P007"] = "unexpected variable 'image'"
    # mask shape mismatch: training (Mask_TaskAll, checked from the header) and validation (acquired mask)
    k = tree.kspace()
    tree.train_file("Cine", *SCANNER, "P008", "cine_sax", k)
    write_mat73(tree.root / tree.TRAIN.format(mod="Cine") / f"Mask_TaskAll/{SCANNER[0]}/{SCANNER[1]}/P008/cine_sax_mask_Uniform8.mat",
                "mask", np.ones((4, 20, 24)))
    bad["cine_sax.mat@P008"] = "mask shape (4, 20, 24) does not match"
    tree.val_file("TaskR1", "Cine", *SCANNER, "P009", "cine_sax", tree.kspace(), mask=np.ones((4, 21, 23), np.float32))
    bad["cine_sax_kus_ktGaussian8.mat@P009"] = "mask shape (4, 21, 23) does not match"
    # a reference of another shape than its kus
    tree.val_file("TaskR1", "Cine", *SCANNER, "P010", "cine_sax", tree.kspace())
    ref = tree.root / tree.VAL.format(task="TaskR1", mod="Cine") / f"FullSample_TaskR1/{SCANNER[0]}/{SCANNER[1]}/P010/cine_sax.mat"
    write_mat73(ref, "kspace", tree.kspace(ny=22))
    bad["cine_sax_kus_ktGaussian8.mat@P010"] = "reference shape"
    # a stray .mat that fits no rule
    (tree.root / "ChallengeData/MultiCoil/Cine/TrainingSet/FullSample/Center005/stray.mat").write_bytes(b"x")
    bad["stray.mat@Center005"] = "expected a P### patient folder"

    out = tmp_path / "out"
    manifest = convert(_cfg(tree.root, out, workers=2))
    errors = {e["source"]: e["problem"] for e in manifest.errors}
    assert len(errors) == len(bad), errors
    for where, problem in bad.items():
        name, folder = where.split("@")
        hits = [(s, m) for s, m in errors.items() if s.endswith(f"{folder}/{name}")]
        assert len(hits) == 1, (where, errors)
        source, message = hits[0]
        assert problem in message, (where, message)
        assert name in message and str(tree.root.resolve()) in message     # names the file, absolute
    # the good file converted completely: 3 slices, and nothing else
    assert manifest.samples() == 3
    assert list(manifest.sources) == [good.relative_to(tree.root).as_posix()]
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert len(on_disk["errors"]) == len(bad)


def test_empty_or_unrecognised_input_errors_and_damages_nothing(tree, tmp_path: Path) -> None:
    tree.train_file("Cine", *SCANNER, "P001", "cine_sax", tree.kspace(nz=3))
    out = tmp_path / "out"
    convert(_cfg(tree.root, out))
    before = _snapshot(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError, match="empty"):
        convert(_cfg(empty, out))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.mat").write_bytes(b"x")
    with pytest.raises(LayoutError, match="unrecognised"):
        convert(_cfg(odd, out))
    assert _snapshot(out) == before


def test_a_rerun_that_fails_midway_leaves_shards_and_manifest_intact(tree, tmp_path: Path, monkeypatch) -> None:
    tree.train_file("Cine", *SCANNER, "P001", "cine_sax", tree.kspace(nz=3))
    out = tmp_path / "out"
    convert(_cfg(tree.root, out))
    before = _snapshot(out)
    for p in ("P002", "P003"):
        tree.train_file("Cine", *SCANNER, p, "cine_sax", tree.kspace(nz=3))
    calls = {"n": 0}
    real_add = ShardSink.add

    def failing_add(self, key, files):   # the disk fills up after 3 samples of the rerun
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real_add(self, key, files)

    monkeypatch.setattr(ShardSink, "add", failing_add)
    with pytest.raises(OSError, match="No space"):
        convert(_cfg(tree.root, out))
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before      # nothing listed was touched
    assert Manifest.read(out).samples() == 3
    new = sorted(set(after) - set(before))
    assert all(n.startswith("train-") for n in new)                         # only new names were written
    # and a clean rerun completes from there without reusing any name
    monkeypatch.setattr(ShardSink, "add", real_add)
    m = convert(_cfg(tree.root, out))
    assert m.samples() == 9 and len({s.name for s in m.shards}) == len(m.shards)
    assert all(_snapshot(out)[k] == v for k, v in before.items() if k.endswith(".tar"))
    assert not list(out.glob("*.tmp"))                                      # the aborted shard was removed
