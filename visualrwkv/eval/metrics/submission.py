"""Files for the benchmarks' evaluation servers (their test answers are not public).

* VQAv2 test-dev / test-std (EvalAI): a JSON list of ``{"question_id": int, "answer": str}``.
  LLaVA's converter runs each reply through the EvalAI answer processor and fills questions of
  the full test2015 question file that have no answer with ``""`` (the server wants every id).
* VizWiz (EvalAI): a JSON list of ``{"image": "VizWiz_test_00000000.jpg", "answer": str}``, one per
  question of the test question file (every question must have an answer).
* MMBench / MMBench-CN: the question tsv without the hint / category / source / image / comment /
  l2-category columns and with a ``prediction`` column after the options (LLaVA writes it as
  .xlsx; .tsv and .csv are written too). The prediction of a row is the reply to that row in its
  original option order.
"""
from __future__ import annotations

import csv
import json
import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Sequence
from xml.sax.saxutils import escape

from visualrwkv.errors import UserError
from visualrwkv.eval.metrics.common import index_answers
from visualrwkv.eval.metrics.vqa import normalize_vqa_answer
from visualrwkv.eval.questions import Question, id_key, is_missing


def _int_id(value: Any) -> Any:
    """Question ids as the servers want them: ints where the id is numeric."""
    if isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
        return int(value)
    return value


def vqav2_submission(answers: Sequence[Dict[str, Any]], questions: Optional[Sequence[Question]] = None
                     ) -> List[Dict[str, Any]]:
    """[{question_id, answer}] for the VQAv2 server. With ``questions`` (the full test question
    file), every question is listed and unanswered ones get ``""``; otherwise the answers' ids."""
    by_id = index_answers(answers)
    if questions is None:
        return [{"question_id": _int_id(a["question_id"]), "answer": normalize_vqa_answer(a["text"])}
                for a in answers]
    out = []
    for q in questions:
        a = by_id.get(id_key(q.id))
        out.append({"question_id": _int_id(q.id), "answer": normalize_vqa_answer(a["text"]) if a else ""})
    return out


def vizwiz_submission(answers: Sequence[Dict[str, Any]], questions: Sequence[Question]) -> List[Dict[str, Any]]:
    """[{image, answer}] for the VizWiz server, in question-file order."""
    by_id = index_answers(answers)
    out = []
    missing = []
    for q in questions:
        a = by_id.get(id_key(q.id))
        if a is None:
            missing.append(q.id)
            continue
        if not isinstance(q.image, str):
            raise UserError(f"question {q.id!r} has no image file name; VizWiz submissions are keyed by image")
        out.append({"image": os.path.basename(q.image), "answer": normalize_vqa_answer(a["text"])})
    if missing:
        raise UserError(f"{len(missing)} VizWiz questions have no answer (e.g. {missing[0]!r}); the server "
                        f"needs all of them")
    return out


# Columns LLaVA drops from the MMBench tsv for the submission file.
_MMBENCH_DROP = ("hint", "category", "source", "image", "comment", "l2-category")


def mmbench_submission_rows(answers: Sequence[Dict[str, Any]], questions: Sequence[Question]) -> List[Dict[str, Any]]:
    """One row per question of the tsv: its columns (minus the dropped ones) + ``prediction``,
    inserted after the last option column. An answer with ``round_id`` > 0 is a rotation and not
    used (the row's prediction is its round-0 reply)."""
    by_id: Dict[str, Dict[str, Any]] = {}
    for a in answers:
        if int(a.get("round_id", 0) or 0) == 0:
            by_id[id_key(a["question_id"])] = a
    rows = []
    for q in questions:
        row: Dict[str, Any] = {}
        for k, v in q.meta.items():
            if k in _MMBENCH_DROP or k.startswith("_"):
                continue
            row[k] = "" if is_missing(v) and k not in ("index",) else v
        a = by_id.get(id_key(q.id))
        row["prediction"] = a["text"] if a else ""
        # Column order: index, question, options, prediction, then the rest (answer, split, ...).
        head = [k for k in ("index", "question") if k in row] + [c for c in "ABCDEFGHI" if c in row]
        ordered = {k: row[k] for k in head}
        ordered["prediction"] = row["prediction"]
        ordered.update({k: v for k, v in row.items() if k not in ordered})
        rows.append(ordered)
    return rows


def write_mmbench_submission(path: str, answers: Sequence[Dict[str, Any]], questions: Sequence[Question]) -> None:
    """Write the MMBench submission as .xlsx, .tsv or .csv (chosen by the extension)."""
    rows = mmbench_submission_rows(answers, questions)
    header: List[str] = []
    for r in rows:
        header.extend(k for k in r if k not in header)
    ext = os.path.splitext(path)[1].lower()
    _ensure_dir(path)
    if ext == ".xlsx":
        write_xlsx(path, header, [[r.get(k, "") for k in header] for r in rows])
    elif ext in (".tsv", ".csv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t" if ext == ".tsv" else ",")
            w.writerow(header)
            for r in rows:
                w.writerow([r.get(k, "") for k in header])
    else:
        raise UserError(f"{path}: MMBench submissions are written as .xlsx, .tsv or .csv")


def write_json_submission(path: str, records: List[Dict[str, Any]]) -> None:
    _ensure_dir(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)


def _ensure_dir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


# --------------------------------------------------------------------------------------------
# A minimal .xlsx writer (one sheet, inline strings and numbers), so that the MMBench upload file
# can be made without openpyxl. An .xlsx file is a zip of a few SpreadsheetML parts.
# --------------------------------------------------------------------------------------------

_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _column_name(i: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA."""
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return name


def _cell(ref: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        value = "" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f'<c r="{ref}"><v>{value}</v></c>'
    text = escape(_XML_ILLEGAL.sub("", str(value)))
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def write_xlsx(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    sheet_rows = []
    for r, values in enumerate([list(header)] + [list(v) for v in rows], 1):
        cells = "".join(_cell(f"{_column_name(c)}{r}", v) for c, v in enumerate(values))
        sheet_rows.append(f'<row r="{r}">{cells}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel_ns = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    parts = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            '</Types>'),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" '
            'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
            'Target="xl/workbook.xml"/></Relationships>'),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook {ns} {rel_ns}>'
            '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" '
            'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" '
            'Target="worksheets/sheet1.xml"/></Relationships>'),
        "xl/worksheets/sheet1.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet {ns}>'
            f'<sheetData>{"".join(sheet_rows)}</sheetData></worksheet>'),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, xml in parts.items():
            z.writestr(name, xml)
