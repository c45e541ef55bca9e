"""Report tables from result records: ``experiments/**/*.json`` -> LaTeX and Markdown, each with provenance.

    modern-llm report-tables --experiments experiments --out-dir report/build/generated

Nothing in the paper or the README tables is typed by hand. Every table cell is one value read from one record
file, and every table carries a source note naming that file (plus its commit, seed, device, dtype and the
protocol fields that decide what the number means). A section whose records do not exist yet renders a
"not yet run" line generated from their absence, so the paper stays honest while results land.

Design choices
- A cell is addressed by ``(source file, metric path)``. The path is ``group + column``: nested dicts are
  joined with ``.``, and the last key is split once more at its last ``/`` (so the bench record's
  ``"ours-native/b1/e2e_tok_s"`` becomes group ``ours-native/b1/`` and column ``e2e_tok_s``). Rows are
  ``(record, group)`` pairs; columns are leaf names. The rendered table shows the group and the column
  verbatim, so anyone (and the round-trip test) can find the number in the JSON from the table alone.
- What counts as a number: ints and floats; ``null`` (the record format's non-finite value) renders as
  "n/a"; a list of exactly two numbers is the project's ``(mean, std)`` convention (``metrics.mean_std``) and
  renders as "mean ± std". Longer lists (per-layer curves, per-seed rows) and strings are left to figures
  and the JSON itself; they never become table cells.
- Records with the same set of columns (same producing code and task) share one table. A table with more
  than ``MAX_COLS`` columns is split into column chunks, or, when mostly empty, printed in long form
  (one row per metric). Rows are chunked at ``MAX_ROWS`` so a table fits a page.
- Numbers show 4 significant digits (integers in full); magnitudes outside [1e-3, 1e6) use scientific form.
- All functions here are pure (records in, text out) except ``load_records`` (reads files) and
  ``write_generated`` (writes the generated files for the LaTeX build and the Markdown summary).

Footguns
- A JSON file under ``experiments/`` that lacks the record keys (e.g. a helper's raw dump) is skipped and
  listed in the provenance summary rather than silently dropped or turned into an error.
- Non-ASCII characters in names are mapped to LaTeX for a few common symbols and to "?" otherwise, because
  pdflatex with the default fonts cannot typeset arbitrary Unicode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modern_llm.utils.records import RECORD_KEYS

MAX_COLS = 6  # value columns per table (a two-column-wide table* holds about this many)
MAX_ROWS = 14  # with one source note per record, 18 rows overflowed a page
ROTATE_FROM = 4  # value columns from which LaTeX headers are set vertically
SIGNIFICANT = 4
MISSING = object()  # the record has no value at this path (rendered "–"); distinct from null ("n/a")
MISSING_TEXT = "–"
NULL_TEXT = "n/a"
TOP_GROUP_TEXT = "·"  # the group cell of top-level metrics
FIGURES_PER_FOLDER = 2
CAPTION_RECORDS = 4  # records named in a figure caption
FIGURE_PRIORITY = ("sink", "curve", "summary", "overview", "scaling", "accuracy", "pass", "ablation")
# protocol fields worth printing next to a source (they decide what a number means)
PROTOCOL_KEYS = (
    "split",
    "eval_split",
    "n_examples",
    "n_eval",
    "n_eval_questions",
    "shots",
    "N",
    "temperature",
    "context",
    "stride",
    "tokenizer",
    "steps",
    "method",
    "seeds",
)

Pair = tuple[float, float]


# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SourceRecord:
    """One result record and where it came from."""

    path: str  # posix path as printed in provenance notes, e.g. "experiments/lm/tinystories_cpu.json"
    area: str  # first folder below the experiments root ("lm", "bench", ...); "" for files at the root
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.record.get("name") or Path(self.path).stem)


def load_records(
    experiments_dir: str | Path, display_root: str | Path | None = None
) -> tuple[list[SourceRecord], list[tuple[str, str]]]:
    """Every record JSON under ``experiments_dir`` (sorted by path) and the skipped files with the reason.

    Paths are shown relative to ``display_root`` (default: the parent of ``experiments_dir``, i.e. the repo
    root, so they read ``experiments/<area>/<file>.json``).
    """
    root = Path(experiments_dir)
    if not root.is_dir():
        return [], []
    shown_from = Path(display_root) if display_root is not None else root.resolve().parent
    records, skipped = [], []
    for file in sorted(root.rglob("*.json")):
        try:
            shown = file.resolve().relative_to(shown_from.resolve()).as_posix()
        except ValueError:
            shown = file.as_posix()
        inner = file.relative_to(root).parts
        area = inner[0] if len(inner) > 1 else ""
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            skipped.append((shown, f"not valid JSON ({err.__class__.__name__})"))
            continue
        if not isinstance(data, dict):
            skipped.append((shown, "not a JSON object"))
            continue
        if set(data) == {"key", "value"}:  # utils.records.save_cached_result: e.g. a pipeline's finished seed
            skipped.append(
                (shown, "a saved intermediate result (its numbers are in the record that used it)")
            )
            continue
        missing = [k for k in RECORD_KEYS if k not in data]
        if missing:
            skipped.append((shown, f"missing record keys {missing}"))
            continue
        if not isinstance(data["metrics"], dict):
            skipped.append((shown, "metrics is not an object"))
            continue
        records.append(SourceRecord(shown, area, data))
    return records, skipped


# ----------------------------------------------------------------------------------------------- metric paths


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_leaves(metrics: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """Key path (tuple of dict keys) -> table value, for every tabulable leaf of ``metrics``, in order.

    Values are int/float, ``None`` (stored non-finite) or a ``(mean, std)`` pair; everything else is skipped.
    """
    out: dict[tuple[str, ...], Any] = {}

    def walk(node: Any, keys: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*keys, str(k)))
        elif node is None or _is_number(node):
            out[keys] = node
        elif isinstance(node, list) and len(node) == 2 and all(_is_number(v) for v in node):
            out[keys] = (float(node[0]), float(node[1]))

    walk(metrics, ())
    return out


def split_path(keys: Sequence[str]) -> tuple[str, str]:
    """(group, column) of a key path; ``group + column`` is the path as printed (see module docstring)."""
    *parents, last = keys
    head, sep, tail = last.rpartition("/")
    if not sep or not tail:
        head, tail = "", last
    group = "".join(f"{p}." for p in parents) + (f"{head}/" if head else "")
    return group, tail


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class TableRow:
    run: str  # record name
    group: str  # metric-path prefix shared by the row's cells ("" = top level)
    tag: str  # source tag ("S1", ...) listed in the table's note
    values: list[Any]  # one per column: number, pair, None, or MISSING


@dataclass
class Table:
    title: str
    columns: list[str]  # leaf names; a long table has the single column "value" and full paths as groups
    rows: list[TableRow]
    sources: dict[str, SourceRecord]  # tag -> record, in tag order
    long: bool = False
    label: str = ""

    @property
    def has_groups(self) -> bool:
        return self.long or any(r.group for r in self.rows)


def _fill_ratio(rows: list[list[Any]]) -> float:
    cells = [v for r in rows for v in r]
    return sum(v is not MISSING for v in cells) / max(1, len(cells))


def _record_rows(rec: SourceRecord) -> list[tuple[str, dict[str, Any]]]:
    """[(group, {column: value})] of one record, groups in first-appearance order."""
    groups: dict[str, dict[str, Any]] = {}
    for keys, value in metric_leaves(rec.record["metrics"]).items():
        group, column = split_path(keys)
        groups.setdefault(group, {})[column] = value
    return list(groups.items())


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [items]


def _tagged(table_rows: list[TableRow], recs: dict[str, SourceRecord]) -> dict[str, SourceRecord]:
    """Re-number the source tags of ``table_rows`` S1.. in order of appearance; return tag -> record."""
    tags: dict[str, str] = {}
    for row in table_rows:
        path = row.tag
        if path not in tags:
            tags[path] = f"S{len(tags) + 1}"
        row.tag = tags[path]
    return {tag: recs[path] for path, tag in tags.items()}


def tables_for_records(records: Sequence[SourceRecord], title: str, label: str = "") -> list[Table]:
    """Tables for one set of records: records with identical column sets share a table (see docstring)."""
    clusters: dict[tuple[str, ...], list[SourceRecord]] = {}
    per_record = {}
    for rec in records:
        rows = _record_rows(rec)
        if not rows:
            continue
        per_record[rec.path] = rows
        signature = tuple(sorted({c for _, cols in rows for c in cols}))
        clusters.setdefault(signature, []).append(rec)
    tables: list[Table] = []
    by_path = {r.path: r for r in records}
    for recs in clusters.values():
        columns: list[str] = []
        flat: list[tuple[SourceRecord, str, dict[str, Any]]] = []
        for rec in recs:
            for group, cols in per_record[rec.path]:
                columns += [c for c in cols if c not in columns]
                flat.append((rec, group, cols))
        grid = [[cols.get(c, MISSING) for c in columns] for _, _, cols in flat]
        if len(columns) > MAX_COLS and _fill_ratio(grid) < 0.5:
            long_rows = [
                TableRow(rec.name, group + c, rec.path, [v])
                for rec, group, cols in flat
                for c, v in cols.items()
            ]
            parts = [(["value"], chunk, True) for chunk in _chunks(long_rows, MAX_ROWS)]
        else:
            parts = []
            for col_chunk in _chunks(columns, MAX_COLS):
                rows = [
                    TableRow(rec.name, group, rec.path, [cols.get(c, MISSING) for c in col_chunk])
                    for rec, group, cols in flat
                    if any(c in cols for c in col_chunk)
                ]
                parts += [(list(col_chunk), chunk, False) for chunk in _chunks(rows, MAX_ROWS)]
        for i, (cols, rows, is_long) in enumerate(parts):
            suffix = f" (part {i + 1}/{len(parts)})" if len(parts) > 1 else ""
            rows = [TableRow(r.run, r.group, r.tag, list(r.values)) for r in rows]
            sources = _tagged(rows, by_path)
            tables.append(Table(title + suffix, cols, rows, sources, is_long, label=label))
    for i, t in enumerate(tables):
        t.label = f"{label or 'tab'}-{i + 1}"
    return tables


# ----------------------------------------------------------------------------------------------- numbers


def format_number(x: int | float) -> str:
    """4 significant digits (ints in full); scientific outside [1e-3, 1e6). Plain text, e.g. '0.4567'."""
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return NULL_TEXT
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e6:
        decimals = max(0, SIGNIFICANT - 1 - math.floor(math.log10(a)))
        return f"{x:.{decimals}f}"
    return f"{x:.{SIGNIFICANT - 1}e}"


def format_value_text(value: Any) -> str:
    """A cell as Markdown/plain text."""
    if value is MISSING:
        return MISSING_TEXT
    if value is None:
        return NULL_TEXT
    if isinstance(value, tuple):
        return f"{format_number(value[0])} ± {format_number(value[1])}"
    return format_number(value)


def _tex_number(text: str) -> str:
    mantissa, e, exponent = text.partition("e")
    if not e:
        return text
    return rf"{mantissa}\times10^{{{int(exponent)}}}"


def format_value_tex(value: Any) -> str:
    """A cell as LaTeX (numbers in math mode so minus signs and exponents typeset properly)."""
    if value is MISSING:
        return "--"
    if value is None:
        return NULL_TEXT
    if isinstance(value, tuple):
        return rf"${_tex_number(format_number(value[0]))}\pm{_tex_number(format_number(value[1]))}$"
    return f"${_tex_number(format_number(value))}$"


# ----------------------------------------------------------------------------------------------- escaping

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_TEX_UNICODE = {"±": r"$\pm$", "·": r"$\cdot$", "×": r"$\times$", "–": "--", "—": "---", "…": r"\ldots{}"}


def tex_escape(text: str) -> str:
    """Plain text -> LaTeX that typesets the same characters (non-ASCII outside a small map -> '?')."""
    out = []
    for ch in str(text):
        if ch in _TEX_SPECIAL:
            out.append(_TEX_SPECIAL[ch])
        elif ch in _TEX_UNICODE:
            out.append(_TEX_UNICODE[ch])
        elif ord(ch) > 126 or (ord(ch) < 32 and ch not in "\n\t"):
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def tex_code(text: str) -> str:
    """Monospace text that may break after '/', '.' and '-' (paths, metric keys, record names)."""
    escaped = tex_escape(text)
    escaped = re.sub(r"([/.\-])", r"\1\\allowbreak{}", escaped)
    return rf"\texttt{{{escaped}}}"


def md_escape(text: str) -> str:
    return str(text).replace("|", r"\|")


# ----------------------------------------------------------------------------------------------- provenance


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def protocol_fields(record: dict[str, Any]) -> list[tuple[str, str]]:
    protocol = record.get("protocol") or {}
    return [(k, _short(protocol[k])) for k in PROTOCOL_KEYS if k in protocol and protocol[k] is not None]


def source_facts(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The record fields a reader needs to trust a number: (label, text) pairs."""
    commit = str(record.get("git_commit") or "unknown")
    facts = [
        ("task", str(record.get("task"))),
        ("model", _short(record.get("model"), 80)),
        ("commit", commit[:7] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit),
        ("seed", str(record.get("seed"))),
        ("device", f"{record.get('device')}/{record.get('dtype')}"),
        ("started", str(record.get("started"))[:10]),
        ("duration", f"{record.get('duration_s')} s"),
    ]
    return facts + protocol_fields(record)


# ----------------------------------------------------------------------------------------------- renderers


def _text_columns(table: Table) -> tuple[bool, bool]:
    """(show the run column, show the src column): both are dropped when one record fills the whole table
    (its name and file are then in the single source note S1)."""
    multi = len(table.sources) > 1
    return multi, multi


def table_to_markdown(table: Table) -> str:
    show_run, show_src = _text_columns(table)
    head = (["run"] if show_run else []) + (["metric" if table.long else "group"] if table.has_groups else [])
    n_text = len(head)
    head += [md_escape(c) for c in table.columns] + (["src"] if show_src else [])
    align = ["---"] * n_text + ["---:"] * len(table.columns) + (["---"] if show_src else [])
    lines = [f"**{md_escape(table.title)}**", "", "| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for row in table.rows:
        cells = [md_escape(row.run)] if show_run else []
        if table.has_groups:
            cells.append(f"`{md_escape(row.group)}`" if row.group else TOP_GROUP_TEXT)
        cells += [format_value_text(v) for v in row.values]
        cells += [row.tag] if show_src else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Sources:"]
    for tag, src in table.sources.items():
        facts = "; ".join(f"{k} {md_escape(v)}" for k, v in source_facts(src.record))
        lines.append(f"- {tag}: `{src.path}` ({md_escape(src.name)}; {facts})")
    return "\n".join(lines) + "\n"


def _tex_header(column: str, rotate: bool) -> str:
    return rf"\rotatebox{{90}}{{{tex_code(column)}}}" if rotate else tex_code(column)


def table_to_latex(table: Table) -> str:
    """A booktabs table (``table*`` across both columns when wide) with its source note underneath.

    Value-column headers are set vertically from ``ROTATE_FROM`` columns on, so long metric names do not force
    the table to shrink to an unreadable size."""
    show_run, show_src = _text_columns(table)
    head = (["run"] if show_run else []) + (["metric" if table.long else "group"] if table.has_groups else [])
    n_text = len(head) + show_src
    wide = len(table.columns) + n_text > 5
    env = "table*" if wide else "table"
    spec = "l" * len(head) + "r" * len(table.columns) + ("l" if show_src else "")
    rotate = len(table.columns) >= ROTATE_FROM
    head += [_tex_header(c, rotate) for c in table.columns] + (["src"] if show_src else [])
    lines = [
        rf"\begin{{{env}}}[tbp]",
        r"\centering\small",
        rf"\caption{{{tex_escape(table.title)}}}",
        rf"\label{{tab:{table.label}}}",
        r"\fitwidth{%",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(head) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        cells = [tex_code(row.run)] if show_run else []
        if table.has_groups:
            cells.append(tex_code(row.group) if row.group else TOP_GROUP_TEXT.replace("·", r"$\cdot$"))
        cells += [format_value_tex(v) for v in row.values]
        cells += [row.tag] if show_src else []
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\par\smallskip", r"{\footnotesize\raggedright"]
    notes = []
    for tag, src in table.sources.items():
        facts = "; ".join(f"{tex_escape(k)} {tex_escape(v)}" for k, v in source_facts(src.record))
        notes.append(rf"\textbf{{{tag}}}: {tex_code(src.path)} ({tex_code(src.name)}; {facts}).")
    lines += [r"Sources: " + " ".join(notes) + r"\par}", rf"\end{{{env}}}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    areas: tuple[str, ...]  # folders under experiments/ whose records belong to this section
    commands: tuple[str, ...]  # per area: what fills it, shown in the "not yet run" line

    def command_for(self, area: str) -> str:
        return self.commands[self.areas.index(area)] if area in self.areas[: len(self.commands)] else ""


SECTIONS: tuple[Section, ...] = (
    Section("architecture", "Inference engine throughput", ("bench",), ("make bench",)),
    Section(
        "pretraining", "Pretraining", ("lm",), ("modern-llm train-lm --config configs/lm/<corpus>.yaml",)
    ),
    Section(
        "long_context",
        "Long context and attention sinks",
        ("long_context", "attention"),
        ("the long-context study (modern_llm.evaluation.long_context)", "modern-llm attention-viz"),
    ),
    Section(
        "finetuning",
        "Finetuning vs prompting",
        ("finetune", "prompting"),
        (
            "python scripts/finetune_<model>_<task>.py --record experiments/finetune/<run>.json",
            "python scripts/prompting_baselines.py --record-dir experiments/prompting",
        ),
    ),
    Section("alignment", "Alignment stages", ("alignment",), ("modern-llm align --config <pipeline>.yaml",)),
    Section(
        "test_time", "Test-time compute", ("test_time",), ("the study in modern_llm.alignment.test_time",)
    ),
    Section(
        "ablations",
        "Ablations",
        ("ablations",),
        ("modern-llm ablate --config configs/ablations/<study>.yaml",),
    ),
    Section(
        "error_analysis", "Error analysis", ("analysis",), ("modern-llm error-analysis --predictions <file>",)
    ),
    Section(
        "quickstart",
        "Quickstart",
        ("quickstart",),
        ("modern-llm quickstart --save-to experiments/quickstart",),
    ),
)


def claimed_areas() -> set[str]:
    return {a for s in SECTIONS for a in s.areas}


def other_section(records: Iterable[SourceRecord]) -> Section | None:
    """A catch-all section for areas no section claims (so no record is silently left out of the paper)."""
    extra = sorted({r.area for r in records} - claimed_areas())
    if not extra:
        return None
    return Section("other", "Other results", tuple(extra), ())


@dataclass(frozen=True)
class FigureRef:
    source: str  # path as shown (relative to the display root)
    file: Path  # absolute file to copy
    tex_name: str  # file name inside the build's figures/ folder
    caption: str


def section_records(records: Sequence[SourceRecord], section: Section) -> list[SourceRecord]:
    return [r for r in records if r.area in section.areas]


def _figure_rank(path: Path) -> tuple[int, str]:
    name = path.stem.lower()
    hits = [i for i, key in enumerate(FIGURE_PRIORITY) if key in name]
    return (hits[0] if hits else len(FIGURE_PRIORITY), name)


def section_figures(
    experiments_dir: str | Path, section: Section, display_root: str | Path | None = None
) -> tuple[list[FigureRef], int]:
    """Up to ``FIGURES_PER_FOLDER`` PNGs per folder of the section's areas, and how many were left out."""
    root = Path(experiments_dir)
    shown_from = (Path(display_root) if display_root else root.resolve().parent).resolve()
    chosen, left_out = [], 0
    for area in section.areas:
        folder = root / area
        if not folder.is_dir():
            continue
        by_folder: dict[Path, list[Path]] = {}
        for png in sorted(folder.rglob("*.png")):
            by_folder.setdefault(png.parent, []).append(png)
        for parent, pngs in by_folder.items():
            ranked = sorted(pngs, key=_figure_rank)
            left_out += max(0, len(ranked) - FIGURES_PER_FOLDER)
            for png in ranked[:FIGURES_PER_FOLDER]:
                try:
                    shown = png.resolve().relative_to(shown_from).as_posix()
                except ValueError:
                    shown = png.as_posix()
                tex_name = re.sub(r"[^A-Za-z0-9]+", "-", png.relative_to(root).with_suffix("").as_posix())
                records_here = _nearest_records(png.stem, [p.name for p in parent.glob("*.json")])
                caption = f"{png.stem.replace('_', ' ')}; figure file {shown}"
                if records_here:
                    caption += f", next to record(s) {records_here}"
                chosen.append(FigureRef(shown, png.resolve(), tex_name + ".png", caption))
    return chosen, left_out


def _nearest_records(stem: str, names: list[str], limit: int = CAPTION_RECORDS) -> str:
    """The ``limit`` records whose names share the longest prefix with the figure's file name, plus a count
    of the rest: a caption listing a whole folder outgrows what TeX can typeset ("Dimension too large")."""
    shared = lambda name: len(os.path.commonprefix([stem, name]))  # noqa: E731
    nearest = sorted(sorted(names, key=lambda n: (-shared(n), n))[:limit])
    more = len(names) - len(nearest)
    return ", ".join(nearest) + (f" and {more} more" if more > 0 else "")


def not_yet_run_tex(section: Section, area: str) -> str:
    """The explicit "not yet run" line for one area, generated from the absence of its records."""
    return (
        rf"\notyetrun{{Not yet run: no result record exists under {tex_code(f'experiments/{area}/')}; "
        rf"it is filled by {tex_code(section.command_for(area))}.}}" + "\n"
    )


def render_section_tex(
    section: Section, records: Sequence[SourceRecord], figures: Sequence[FigureRef] = (), left_out: int = 0
) -> str:
    """The generated LaTeX for one section: tables, figures and "not yet run" lines."""
    mine = section_records(records, section)
    present = {r.area for r in mine}
    parts = [f"% generated by modern_llm.evaluation.report_tables for section '{section.key}'; do not edit\n"]
    if section.key == "other":  # the catch-all has no heading in paper.tex
        parts.append(rf"\section{{{tex_escape(section.title)}}}" + "\n")
    for area in section.areas:
        recs = [r for r in mine if r.area == area]
        if not recs:
            parts.append(not_yet_run_tex(section, area))
        for table in tables_for_records(
            recs, f"{section.title}: experiments/{area}", f"{section.key}-{area}"
        ):
            parts.append(table_to_latex(table))
        for r in recs:
            if not _record_rows(r):
                parts.append(rf"\noindent Record {tex_code(r.path)} holds no tabulable numbers.\par" + "\n")
    for fig in figures:
        parts.append(
            "\n".join(
                [
                    r"\begin{figure}[tbp]",
                    r"\centering",
                    rf"\includegraphics[width=\linewidth]{{figures/{fig.tex_name}}}",
                    rf"\caption{{{tex_escape(fig.caption)}}}",
                    r"\end{figure}",
                ]
            )
            + "\n"
        )
    if left_out:
        parts.append(
            rf"\noindent\emph{{{left_out} further figure(s) of this section are in the experiment folders "
            rf"({', '.join(tex_code('experiments/' + a + '/') for a in sorted(present))}).}}\par" + "\n"
        )
    return "".join(parts)


def render_provenance_tex(records: Sequence[SourceRecord], skipped: Sequence[tuple[str, str]]) -> str:
    """Counts of records by device/dtype/commit and the files skipped, for the limitations section."""
    if not records:
        return r"\notyetrun{No result records exist yet under \texttt{experiments/}.}" + "\n"
    by_device: dict[str, int] = {}
    commits = set()
    for r in records:
        key = f"{r.record.get('device')}/{r.record.get('dtype')}"
        by_device[key] = by_device.get(key, 0) + 1
        commits.add(str(r.record.get("git_commit"))[:7])
    devices = ", ".join(f"{tex_escape(k)}: {v}" for k, v in sorted(by_device.items()))
    text = (
        rf"This paper was generated from {len(records)} record file(s) written at {len(commits)} "
        rf"distinct commit(s). Records by device/dtype: {devices}."
    )
    if skipped:
        items = "; ".join(f"{tex_code(p)} ({tex_escape(why)})" for p, why in skipped)
        text += rf" JSON files skipped because they are not result records: {items}."
    return text + "\n"


def render_markdown(records: Sequence[SourceRecord], skipped: Sequence[tuple[str, str]] = ()) -> str:
    """All sections' tables as one Markdown document (for the README / a quick look without TeX)."""
    out = ["# Results (generated from experiments/; do not edit)", ""]
    sections = list(SECTIONS) + [s for s in [other_section(records)] if s]
    for section in sections:
        out += [f"## {section.title}", ""]
        mine = section_records(records, section)
        for area in section.areas:
            recs = [r for r in mine if r.area == area]
            if not recs:
                out += [
                    f"_Not yet run: no record under experiments/{area}/ ({section.command_for(area)})._",
                    "",
                ]
            for table in tables_for_records(recs, f"{section.title}: experiments/{area}", section.key):
                out += [table_to_markdown(table)]
    if skipped:
        out += ["## Skipped files", ""] + [f"- `{p}`: {why}" for p, why in skipped] + [""]
    return "\n".join(out)


@dataclass
class GeneratedFiles:
    sections: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    markdown: Path | None = None
    provenance: Path | None = None


def _clear_generated(out_dir: Path, fig_dir: Path) -> None:
    """Remove only files this module writes (never a whole folder the caller may have pointed elsewhere)."""
    for old in [*out_dir.glob("*.tex"), out_dir / "results.md", *fig_dir.glob("*.png")]:
        old.unlink(missing_ok=True)


def write_generated(experiments_dir: str | Path, out_dir: str | Path) -> GeneratedFiles:
    """Write ``<out_dir>/<section>.tex`` for every section, ``provenance.tex``, ``results.md`` and the
    section figures (copied to ``<out_dir>/figures/``; paper.tex sets ``\\graphicspath`` to ``out_dir``).

    Previously generated files are removed first, so a deleted record cannot survive in the paper.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    _clear_generated(out_dir, fig_dir)
    records, skipped = load_records(experiments_dir)
    files = GeneratedFiles()
    sections = list(SECTIONS)
    extra = other_section(records)
    for section in [*sections, extra] if extra else sections:
        figures, left_out = section_figures(experiments_dir, section)
        for fig in figures:
            shutil.copyfile(fig.file, fig_dir / fig.tex_name)
            files.figures.append(fig_dir / fig.tex_name)
        path = out_dir / f"{section.key}.tex"
        path.write_text(render_section_tex(section, records, figures, left_out))
        files.sections[section.key] = path
    if extra is None:  # paper.tex always inputs other.tex
        (out_dir / "other.tex").write_text("% generated: every record area is claimed by a section\n")
        files.sections["other"] = out_dir / "other.tex"
    files.provenance = out_dir / "provenance.tex"
    files.provenance.write_text(render_provenance_tex(records, skipped))
    files.markdown = out_dir / "results.md"
    files.markdown.write_text(render_markdown(records, skipped))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modern-llm report-tables",
        description="Render every result record under --experiments as LaTeX sections (for report/paper.tex) "
        "and one Markdown summary, each table with a note naming its source files.",
    )
    parser.add_argument("--experiments", default="experiments", help="records root (default: experiments)")
    parser.add_argument("--out-dir", default="report/build/generated", help="where the .tex/.md files go")
    args = parser.parse_args(argv)
    files = write_generated(args.experiments, args.out_dir)
    print(f"{len(files.sections)} section files, {len(files.figures)} figures -> {args.out_dir}")
    print(f"markdown: {files.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
