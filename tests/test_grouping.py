"""The organisers' patient sheet (xlsx / csv) or folder names decide the scoring groups, and evaluate
says which; a group without a valid file is named and handled as `process_task` handles it."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from challenge.grouping import load_group_map
from challenge.submission import save_img4ranking
from finetune import evaluate


def write_xlsx(path: Path, sheets: dict[str, list[list[str]]]) -> None:
    """A minimal .xlsx (inline strings), written by hand from the OOXML layout."""
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rns = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>')
        entries = "".join(f'<sheet name="{n}" sheetId="{i + 1}" r:id="rId{i + 1}"/>' for i, n in enumerate(sheets))
        z.writestr("xl/workbook.xml", f'<?xml version="1.0"?><workbook {ns} {rns}><sheets>{entries}</sheets></workbook>')
        rels = "".join(f'<Relationship Id="rId{i + 1}" Type="worksheet" Target="worksheets/sheet{i + 1}.xml"/>'
                       for i in range(len(sheets)))
        z.writestr("xl/_rels/workbook.xml.rels",
                   f'<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">{rels}</Relationships>')
        for i, rows in enumerate(sheets.values()):
            xml_rows = ""
            for r, row in enumerate(rows, 1):
                cells = "".join(f'<c r="{chr(65 + c)}{r}" t="inlineStr"><is><t>{v}</t></is></c>'
                                for c, v in enumerate(row) if v != "")
                xml_rows += f'<row r="{r}">{cells}</row>'
            z.writestr(f"xl/worksheets/sheet{i + 1}.xml",
                       f'<?xml version="1.0"?><worksheet {ns}><sheetData>{xml_rows}</sheetData></worksheet>')


HEADER = ["Center", "Manufacturer", "AnonPatientID", "Disease1", "Disease2", "Disease3", "Disease4", "Disease5"]


def test_sheet_groups_as_the_scorers_do(tmp_path: Path) -> None:
    sheet = tmp_path / "info.xlsx"
    write_xlsx(sheet, {
        "TaskR1": [HEADER[:3], ["Center001", "UIH_30T_umr780", "P001"]],
        "TaskR2": [HEADER,
                   ["Center001", "UIH_30T_umr780", "P010", " Myocarditis ", "Hypertrophic cardiomyopathy, HCM", "", "", ""],
                   ["Center001", "UIH_30T_umr780", "P011", "Myocarditis", "", "", "", "Amyloidosis"]],
    })
    g = load_group_map(sheet)
    assert "info.xlsx" in g.source
    assert g.file_groups("TaskR1", "Center001", "UIH_30T_umr780", "P001", "val2025") == [("Center001", "UIH_30T_umr780")]
    assert g.file_groups("TaskR1", "Center001", "UIH_30T_umr780", "P002", "val2025") == [("Unknown", "Unknown")]
    assert g.file_groups("TaskR2", "Center001", "UIH_30T_umr780", "P010", "val2025") == [
        ("Hypertrophic_cardiomyopathy_HCM",), ("Myocarditis",)]
    # Disease5 is read by the test scorer only
    assert g.file_groups("TaskR2", "Center001", "UIH_30T_umr780", "P011", "val2025") == [("Myocarditis",)]
    assert g.file_groups("TaskR2", "Center001", "UIH_30T_umr780", "P011", "test2025") == [
        ("Amyloidosis",), ("Myocarditis",)]
    assert g.summary_name("TaskR2") == "diseases" and g.summary_name("TaskR1") == "centers"
    # the same rows as csv
    csv_sheet = tmp_path / "info.csv"
    with open(csv_sheet, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Task", *HEADER])
        w.writerow(["TaskR2", "Center001", "UIH_30T_umr780", "P011", "Myocarditis", "", "", "", "Amyloidosis"])
    c = load_group_map(csv_sheet)
    assert c.file_groups("TaskR2", "Center001", "UIH_30T_umr780", "P011", "test2025") == [
        ("Amyloidosis",), ("Myocarditis",)]
    assert not c.has_sheet("TaskR1")
    folder = load_group_map("")
    assert folder.source == "folder names"
    assert folder.file_groups("TaskR2", "C", "V", "P", "val2025") == [("C", "V")]
    with pytest.raises(ValueError, match="nope.xlsx"):
        load_group_map(tmp_path / "nope.xlsx")


def _tree(root: Path, folder: str, files: list[tuple[str, str, str, str]], arrays: dict[str, np.ndarray]) -> None:
    for task, center, vendor, patient in files:
        name = "cine_sax.mat" if folder == "FullSample" else "cine_sax_kus_Uniform8.mat"
        d = root / task / "MultiCoil" / "Cine" / "ValidationSet" / f"{folder}_{task}" / center / vendor / patient
        save_img4ranking(d / name, arrays[patient])


def test_diseases_missing_group_and_nan_files_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    pats = ["P010", "P011", "P012"]
    gt = {p: (rng.gamma(2.0, 1.0, (16, 18, 2, 3)) * 40).astype(np.float32) for p in pats}
    files = [("TaskR2", "Center001", "UIH_30T_umr780", p) for p in pats]
    _tree(tmp_path / "gt", "FullSample", files, gt)
    rec = {p: gt[p] + rng.standard_normal(gt[p].shape).astype(np.float32) * 4 for p in pats}
    rec["P011"][3, 4, 1, 2] = np.nan  # a NaN pixel: NaN metrics, still a valid file
    rec["P010"][:, :, 0, 0] = 0  # an all-zero image taken as the reference: infinite metrics
    _tree(tmp_path / "rec", "UnderSample", files[:2], rec)  # P012 (the only Amyloidosis patient) missing
    sheet = tmp_path / "info.xlsx"
    write_xlsx(sheet, {"TaskR2": [HEADER,
                                  ["Center001", "UIH_30T_umr780", "P010", "Myocarditis"],
                                  ["Center001", "UIH_30T_umr780", "P011", "Myocarditis", "Myocarditis"],
                                  ["Center001", "UIH_30T_umr780", "P012", "Amyloidosis"]]})
    out = tmp_path / "eval"
    rc = evaluate.main(["--set", f"recon={tmp_path / 'rec'}", "--set", f"reference={tmp_path / 'gt'}",
                        "--set", f"out={out}", "--set", f"mapping={sheet}", "--set", "progress=false",
                        "--set", "figures=false"])
    captured = capsys.readouterr()
    assert rc == 0
    assert f"groups from sheet {sheet}" in captured.out
    assert "WARNING cmrfm TaskR2 val2025: 1 group(s) with no valid file" in captured.err and "Amyloidosis" in captured.err
    res = json.loads((out / "results_all.json").read_text())["cmrfm"]["TaskR2"]
    exact, clean = res["val2025"], res["clean"]
    rows = {r["patient"]: r for r in csv.DictReader(open(out / "per_file.csv"))}
    assert rows["P011"]["status"] == "nan_metric"
    assert rows["P010"]["status"] == "inf_metric" and float(rows["P010"]["psnr"]) == -np.inf
    # pandas: the NaN file counts in Num (2/2) and as 0 in the sum; Amyloidosis drops out of the mean
    # P011 lists Myocarditis twice: the scorers count its file twice in the expected number, once in the group
    assert exact["Num_Files"] == "2/3" and exact["Myocarditis_Num"] == "2/3"
    assert exact["Myocarditis_PSNR_adj"] == -np.inf
    assert "Amyloidosis_Num" not in exact
    assert exact["Mean_of_all_diseases_PSNR_adj"] == -np.inf
    # the clean variant (ground truth as reference) has a finite P010: its sum / 2 is the group value
    p010 = float(rows["P010"]["psnr_clean"])
    assert clean["Myocarditis_PSNR_adj"] == pytest.approx(p010 / 3)
    assert clean["Amyloidosis_PSNR_adj"] == 0.0
    assert clean["Mean_of_all_diseases_PSNR_adj"] == pytest.approx(p010 / 6)
    problems = list(csv.DictReader(open(out / "problems.csv")))
    kinds = {(p["kind"], p["path"].split("/")[-3] if "/" in p["path"] else p["path"]) for p in problems}
    assert ("nan_metric", "P011") in {(p["kind"], Path(p["path"]).parent.name) for p in problems}
    assert ("inf_metric", "P010") in {(p["kind"], Path(p["path"]).parent.name) for p in problems}
    assert any(p["kind"] == "missing_group" and "Amyloidosis" in p["message"] for p in problems)
    assert ("missing", "P012") in {(p["kind"], Path(p["path"]).parent.name) for p in problems}
    del kinds


def test_the_validation_scorers_vendor_rename(tmp_path: Path) -> None:
    """Val_Score2025.py renames TaskR2 Mapping Center004/UIH_30T_umr780 to UIH_15T_umr680 before
    pairing; the test scorer does not, so for it the file is missing."""
    rng = np.random.default_rng(2)
    gt = (rng.gamma(2.0, 1.0, (16, 18, 2, 9)) * 40).astype(np.float32)
    d = "TaskR2/MultiCoil/Mapping/ValidationSet"
    save_img4ranking(tmp_path / "gt" / d / "FullSample_TaskR2/Center004/UIH_15T_umr680/P001/T1map.mat", gt)
    save_img4ranking(tmp_path / "rec" / d / "UnderSample_TaskR2/Center004/UIH_30T_umr780/P001/T1map_kus_Uniform8.mat",
                     gt + rng.standard_normal(gt.shape).astype(np.float32))
    ev = evaluate.evaluate(evaluate.EvalConfig(recon=str(tmp_path / "rec"), reference=str(tmp_path / "gt"),
                                               out=str(tmp_path / "eval"), figures=False, progress=False))
    (row,) = ev.rows
    assert row.case.vendor == "UIH_15T_umr680" and row.status == "ok"
    assert row.scores["val2025"].valid and not row.scores["test2025"].valid
    res = ev.results["cmrfm"]["TaskR2"]
    assert res["val2025"]["Num_Files"] == "1/1" and res["test2025"]["Num_Files"] == "0/1"
