"""The CMRxRecon2025 submission tree: case identity from paths, img4ranking files, reference files.

A validation input file sits at (docs/cmrxrecon.md §2.2)::

    <root>/<Task>/MultiCoil/<Modality>/ValidationSet/UnderSample_<Task>/<Center>/<Vendor>/P###/<file>_kus_<Pattern><R>.mat

its reconstruction goes to the same relative path under the output root, with the same file name,
holding one variable `img4ranking` (float32, MATLAB order, MAT v5: a v7.3 file would be read by the
validation scorer through h5py without transposing and fail the shape check; §6.4, trap 12). The
hidden ground truth sits at `<gt>/<Task>/MultiCoil/<Modality>/ValidationSet/FullSample_<Task>/
<Center>/<Vendor>/P###/<file>.mat`. The test set has `TestSet` in place of `ValidationSet`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from scipy.io.matlab import matfile_version

KUS_NAME = re.compile(r"^(?P<stem>.+)_kus_(?P<pattern>[A-Za-z]+?)(?P<R>\d+)\.mat$")
IMG4RANKING_KEY = "img4ranking"


class SubmissionError(ValueError):
    """A path or file that does not fit the submission layout; the message names it."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class CaseId:
    """Where one file sits in a challenge tree (everything the scorer reads from the path)."""

    task: str  # "TaskR1"
    modality: str  # "Cine"
    set_type: str  # "ValidationSet" | "TestSet"
    center: str  # "Center001"
    vendor: str  # "UIH_30T_umr780"
    patient: str  # "P007"
    stem: str  # "cine_lax_4ch": the FullSample file is <stem>.mat
    file_name: str  # "cine_lax_4ch_kus_ktRadial16.mat" (the stem + ".mat" for reference files)
    pattern: str | None = None  # "ktRadial" (kus files only)
    R: int | None = None  # 16 (kus files only)

    @property
    def match_key(self) -> tuple[str, str, str, str, str, str, str]:
        """What pairs a reconstruction with its reference: everything but the kus suffix."""
        return (self.task, self.modality, self.set_type, self.center, self.vendor, self.patient, self.stem)

    @property
    def group(self) -> tuple[str, str]:
        """TaskR1 scoring group (Center, Vendor)."""
        return (self.center, self.vendor)

    def relative_path(self, folder_prefix: str = "UnderSample_") -> Path:
        """`<Task>/MultiCoil/<Modality>/<Set>/<prefix><Task>/<Center>/<Vendor>/<P>/<file_name>`."""
        return Path(
            self.task, "MultiCoil", self.modality, self.set_type, f"{folder_prefix}{self.task}",
            self.center, self.vendor, self.patient, self.file_name,
        )


def _tree_parts(path: Path, folder_prefix: str) -> tuple[str, ...]:
    parts = path.parts
    if len(parts) < 9 or parts[-8] != "MultiCoil":
        raise SubmissionError(
            path,
            "not in the challenge layout <Task>/MultiCoil/<Modality>/<Set>/"
            f"{folder_prefix}<Task>/<Center>/<Vendor>/P###/<file>.mat",
        )
    task, _, modality, set_type, folder, center, vendor, patient, name = parts[-9:]
    # The test scorer also accepts the bare <Task> folder in place of UnderSample_<Task>.
    if folder not in (f"{folder_prefix}{task}", task):
        raise SubmissionError(path, f"folder {folder!r} should be {folder_prefix}{task}")
    return task, modality, set_type, center, vendor, patient, name


def parse_kus_path(path: str | os.PathLike) -> CaseId:
    """CaseId of an undersampled input or reconstruction file `..._kus_<Pattern><R>.mat`."""
    path = Path(path)
    task, modality, set_type, center, vendor, patient, name = _tree_parts(path, "UnderSample_")
    m = KUS_NAME.match(name)
    if m is None:
        raise SubmissionError(path, "file name is not <file>_kus_<Pattern><R>.mat")
    return CaseId(task, modality, set_type, center, vendor, patient, m["stem"], name, m["pattern"], int(m["R"]))


def parse_reference_path(path: str | os.PathLike) -> CaseId:
    """CaseId of a hidden ground-truth file `.../FullSample_<Task>/<Center>/<Vendor>/P###/<file>.mat`."""
    path = Path(path)
    task, modality, set_type, center, vendor, patient, name = _tree_parts(path, "FullSample_")
    if not name.endswith(".mat"):
        raise SubmissionError(path, "reference file is not a .mat file")
    return CaseId(task, modality, set_type, center, vendor, patient, name[: -len(".mat")], name)


def submission_path(kus_path: str | os.PathLike, out_root: str | os.PathLike) -> Path:
    """Where the reconstruction of input `kus_path` goes under `out_root` (same relative path and name)."""
    return Path(out_root) / parse_kus_path(kus_path).relative_path("UnderSample_")


def mask_path(kus_path: str | os.PathLike) -> Path:
    """The mask file beside an input kus file: `Mask_<Task>/.../<file>_mask_<Pattern><R>.mat`."""
    kus_path = Path(kus_path)
    case = parse_kus_path(kus_path)
    base = kus_path.parents[4]  # the <Set> folder
    return base / f"Mask_{case.task}" / case.center / case.vendor / case.patient / (
        f"{case.stem}_mask_{case.pattern}{case.R}.mat"
    )


#: the 116-byte descriptive text of a MAT v5 header, fixed: scipy puts the creation time there, which
#: would make two identical reconstructions (one process or several, a rerun) differ byte for byte.
MAT5_HEADER = b"MATLAB 5.0 MAT-file, written by cmrfm".ljust(116)


def save_img4ranking(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """Write `arr` as the single variable `img4ranking`, float32, MAT v5, atomically.

    arr is written as given (MATLAB order, the run4ranking output): never squeezed. The file goes
    through a temporary name and `os.replace`; a file object is handed to scipy so it cannot append
    ".mat" to the temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    if data.ndim < 2:
        raise SubmissionError(path, f"img4ranking must be at least 2-D, got shape {data.shape}")
    buf = io.BytesIO()
    scipy.io.savemat(buf, {IMG4RANKING_KEY: data}, format="5", do_compression=False)
    raw = bytearray(buf.getvalue())
    raw[:len(MAT5_HEADER)] = MAT5_HEADER       # scipy writes the creation time there
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(raw)
    os.replace(tmp, path)
    return path


def mat_version(path: str | os.PathLike) -> str:
    """"v5" (MAT v5/v7, what the validation scorer reads with scipy), "v7.3" (HDF5 with a MATLAB
    header) or "hdf5" (plain HDF5, which both scorers' h5py fallback also opens), from the header.

    Raises SubmissionError naming the file for anything else (v4, empty, not a MAT file).
    """
    path = Path(path)
    try:
        major, _ = matfile_version(str(path))
    except Exception as exc:  # noqa: BLE001 - missing, empty or foreign file: named
        if path.is_file() and h5py.is_hdf5(str(path)):
            return "hdf5"
        raise SubmissionError(path, f"not a readable MAT file ({exc})") from None
    if major == 1:
        return "v5"
    if major == 2:
        return "v7.3"
    raise SubmissionError(path, "MAT v4 file (the scorers read MAT v5/v7 or v7.3 only)")


def mat_keys(path: str | os.PathLike) -> list[str]:
    """Variable names in a MAT file (v5 via scipy, v7.3 via h5py) without reading the data."""
    path = Path(path)
    version = mat_version(path)
    try:
        if version == "v5":
            return [name for name, _, _ in scipy.io.whosmat(path)]
        with h5py.File(path, "r") as f:
            return [k for k in f.keys() if not k.startswith("#")]
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file, named
        raise SubmissionError(path, f"not a readable MAT file ({exc})") from None


def load_img4ranking(path: str | os.PathLike, reverse_h5_axes: bool = False) -> np.ndarray:
    """Read `img4ranking` as the validation scorer does: scipy first, h5py fallback for v7.3.

    The validation scorer does NOT transpose what h5py returns (so a v7.3 submission is scored on
    reversed axes); `reverse_h5_axes=True` gives the test scorer's behaviour instead.
    """
    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:  # v7.3 (HDF5)
        with h5py.File(path, "r") as f:
            if IMG4RANKING_KEY not in f:
                raise SubmissionError(path, f"no variable {IMG4RANKING_KEY!r} (found {list(f.keys())})") from None
            arr = f[IMG4RANKING_KEY][()]
        return arr.T if reverse_h5_axes else arr
    except Exception as exc:  # noqa: BLE001
        raise SubmissionError(path, f"not a readable MAT file ({exc})") from None
    if IMG4RANKING_KEY not in mat:
        found = [k for k in mat if not k.startswith("__")]
        raise SubmissionError(path, f"no variable {IMG4RANKING_KEY!r} (found {found})")
    return mat[IMG4RANKING_KEY]
