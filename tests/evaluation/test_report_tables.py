"""Report tables: parse the generated LaTeX and Markdown back and check every cell against its source JSON.

The parsers and the JSON path resolver here are written independently of ``report_tables`` (they only
know the printed format: a group/metric column + a column header = the metric path; the source tag's note
names the file), so a table that shows a wrong, shifted or mis-attributed number fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from modern_llm.evaluation import report_tables as rt

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- fixtures


def record(name: str, metrics: dict, task: str = "t", **extra) -> dict:
    base = {
        "name": name,
        "task": task,
        "model": "tiny & co",
        "metrics": metrics,
        "protocol": {
            "split": "test",
            "eval_split": "te_st",
            "n_examples": 50,
            "shots": 0,
            "config": {"x": 1},
        },
        "command": "python x.py",
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "seed": 0,
        "device": "cpu",
        "dtype": "fp32",
        "started": "2026-11-25T08:00:00+00:00",
        "duration_s": 12.5,
    }
    return base | extra


def write(root: Path, rel: str, data) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def experiments(tmp_path) -> Path:
    root = tmp_path / "experiments"
    write(
        root,
        "lm/small_run.json",
        record(
            "lm_small",
            {
                "val_loss": 2.345678,
                "val_ppl": 10.44,
                "val_bpb": 1.2345,
                "params": 123456,
                "tokens_seen": 9_800_000,
            },
        ),
    )
    write(
        root,
        "lm/other_run.json",
        record(
            "lm-b",
            {"val_loss": 3.0, "val_ppl": 20.085536923, "val_bpb": None, "params": 1000, "tokens_seen": 5},
        ),
    )
    write(
        root,
        "bench/decode.json",
        record(
            "decode",
            {
                "ours/b1/tok_s": 80.9,
                "ours/b1/lat_ms": 0.00012345,
                "hf/b1/tok_s": 75.25,
                "hf/b1/lat_ms": 2.5e7,
            },
        ),
    )
    write(
        root,
        "alignment/gsm8k.json",
        record(
            "align_%test",
            {
                "summary": {
                    "base": {"accuracy": [0.1, 0.0], "maj_at_n": [0.2, 0.05]},
                    "sft": {"accuracy": [0.41234, 0.0123], "maj_at_n": [0.5, 0.1]},
                    "dpo+verifier": {"verifier_at_n": [0.6, 0.02]},
                },
                "stage_gains": [{"stage": "sft", "value": [0.4, 0.1]}],  # list of dicts: not tabulated
                "per_layer": [0.1, 0.2, 0.3],  # long list: figures only
                "note": "text is not a number",
            },
        ),
    )
    # one record whose groups have disjoint metric names: 8 columns, mostly empty -> long form
    groups = {f"g{i}": {f"m{2 * i}": -i / 7, f"m{2 * i + 1}": i * 1.5} for i in range(4)}
    write(root, "ablations/a.json", record("abl-a", groups | {"x_1": -0.5}))
    # dense and wide -> column chunks
    write(
        root, "test_time/wide.json", record("wide", {f"acc_at_{n}": n / 64 for n in (1, 2, 4, 8, 16, 32, 64)})
    )
    # an area no section claims -> "Other results"
    write(root, "misc_area/z.json", record("z", {"weird key_with $&#": 1.0}))
    write(root, "attention/raw_dump.json", {"layers": [1, 2]})  # not a record: skipped
    write(root, "attention/broken.json", "{not json")
    write(root, "alignment/seeds/run-seed0.json", {"key": {"seed": 0}, "value": {"evals": {}}})  # a kept seed
    return root


# ----------------------------------------------------------------------------------------------- parsers


def untex(text: str) -> str:
    text = text.strip()
    rotated = re.fullmatch(r"\\rotatebox\{90\}\{(.*)\}", text, flags=re.S)
    if rotated:
        text = rotated.group(1)
    m = re.fullmatch(r"\\texttt\{(.*)\}", text, flags=re.S)
    if m:
        text = m.group(1)
    text = text.replace(r"\allowbreak{}", "")
    for src, dst in [
        (r"\textbackslash{}", "\\"),
        (r"\textasciitilde{}", "~"),
        (r"\textasciicircum{}", "^"),
        (r"\&", "&"),
        (r"\%", "%"),
        (r"\$", "$"),
        (r"\#", "#"),
        (r"\_", "_"),
        (r"\{", "{"),
        (r"\}", "}"),
    ]:
        text = text.replace(src, dst)
    return text


def split_cells(line: str, sep: str) -> list[str]:
    cells = [c.strip() for c in re.split(rf"(?<!\\){re.escape(sep)}", line)]
    return [c.replace("\\|", "|") for c in cells] if sep == "|" else cells


def parse_latex_tables(tex: str) -> list[dict]:
    tables = []
    for block in re.findall(r"\\begin\{tabular\}.*?\\end\{table\*?\}", tex, flags=re.S):
        body = block.split(r"\toprule")[1].split(r"\bottomrule")[0]
        head_line, rows_part = body.split(r"\midrule")
        header = [untex(c) for c in split_cells(head_line.strip().removesuffix(r"\\").strip(), "&")]
        rows = [
            split_cells(line.strip().removesuffix(r"\\").strip(), "&")
            for line in rows_part.strip().splitlines()
            if line.strip()
        ]
        sources = {
            tag: untex(path) for tag, path in re.findall(r"\\textbf\{(S\d+)\}: (\\texttt\{.*?\}) \(", block)
        }
        tables.append({"header": header, "rows": rows, "sources": sources, "format": "tex"})
    return tables


def parse_markdown_tables(md: str) -> list[dict]:
    tables = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = split_cells(lines[i].strip("|"), "|")
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_cells(lines[i].strip()[1:-1], "|"))
                i += 1
            sources = {}
            while i < len(lines) and not lines[i].startswith("**") and not lines[i].startswith("#"):
                m = re.match(r"- (S\d+): `(.*?)` \(", lines[i])
                if m:
                    sources[m.group(1)] = m.group(2)
                i += 1
            tables.append({"header": header, "rows": rows, "sources": sources, "format": "md"})
        else:
            i += 1
    return tables


def parse_number(text: str, fmt: str) -> tuple[float, float]:
    """(value, half a unit in the last shown digit) of a rendered number."""
    if fmt == "tex":
        text = text.replace(r"\times10^{", "e").replace("}", "")
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    scale = int(exponent) if exponent else 0
    return float(text), 0.5 * 10.0 ** (scale - decimals)


def parse_cell(text: str, fmt: str):
    """'missing' | None (n/a) | [(value, tol)] or [(mean, tol), (std, tol)]."""
    if text in ("–", "--"):
        return "missing"
    if text == "n/a":
        return None
    if fmt == "tex":
        assert text.startswith("$") and text.endswith("$"), text
        parts = text[1:-1].split(r"\pm")
    else:
        parts = text.split(" ± ")
    return [parse_number(p.strip(), fmt) for p in parts]


def resolve(metrics, path: str):
    """Walk dict keys joined by '.', preferring the longest key that matches (keys may contain '.')."""
    node, rest = metrics, path
    while True:
        if not isinstance(node, dict):
            raise KeyError(path)
        if rest in node:
            return node[rest]
        keys = sorted((k for k in node if rest.startswith(k + ".")), key=len, reverse=True)
        if not keys:
            raise KeyError(path)
        node, rest = node[keys[0]], rest[len(keys[0]) + 1 :]


def cells_of(table: dict):
    """Yield (source path, metric path, cell text) for every value cell of a parsed table.

    Layout: [run] [group|metric] values... [src]; run and src columns exist only for multi-source tables."""
    header, fmt = table["header"], table["format"]
    has_run, has_src = header[0] == "run", header[-1] == "src"
    assert has_run == has_src, header
    if not has_src:
        assert len(table["sources"]) == 1, table["sources"]
    g = int(has_run)
    has_group = header[g] in ("group", "metric")
    long = header[g] == "metric"
    first_value, end = g + has_group, len(header) - has_src
    for row in table["rows"]:
        assert len(row) == len(header), (header, row)
        source = table["sources"][row[-1]] if has_src else next(iter(table["sources"].values()))
        group = ""
        if has_group:
            cell = row[g]
            if fmt == "md":
                group = "" if cell == rt.TOP_GROUP_TEXT else cell.strip("`")
            else:
                group = "" if cell == r"$\cdot$" else untex(cell)
        for col, text in zip(header[first_value:end], row[first_value:end]):
            yield source, group if long else group + col, text


def check_tables(tables: list[dict], root_parent: Path) -> set[tuple[str, str]]:
    """Assert every cell equals the JSON value at its path (to the shown precision); return cells seen."""
    seen = set()
    assert tables, "no tables parsed"
    for table in tables:
        for source, path, text in cells_of(table):
            data = json.loads((root_parent / source).read_text())
            parsed = parse_cell(text, table["format"])
            try:
                truth = resolve(data["metrics"], path)
            except KeyError:
                assert parsed == "missing", f"{source}: {path} shown as {text!r} but absent from the JSON"
                continue
            seen.add((source, path))
            if truth is None:
                assert parsed is None, f"{source}: {path} is null but shown as {text!r}"
                continue
            truth_list = truth if isinstance(truth, list) else [truth]
            assert parsed not in ("missing", None) and len(parsed) == len(truth_list), (source, path, text)
            for (shown, tol), true in zip(parsed, truth_list):
                assert abs(shown - true) <= tol * (1 + 1e-9) + 1e-12, (
                    f"{source}: {path} = {true}, shown {text}"
                )
    return seen


def numeric_leaves(metrics, prefix=""):
    """Every number / (mean, std) pair / null of a metrics dict, by printed path (independent of rt)."""
    for k, v in metrics.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from numeric_leaves(v, path + ".")
        elif v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            yield path
        elif isinstance(v, list) and len(v) == 2 and all(type(x) in (int, float) for x in v):
            yield path  # noqa: SIM114 - a (mean, std) pair, kept apart from the scalar case for clarity


def all_tex(records, skipped, experiments_dir) -> str:
    sections = list(rt.SECTIONS) + [s for s in [rt.other_section(records)] if s]
    return "".join(rt.render_section_tex(s, records) for s in sections)


# ----------------------------------------------------------------------------------------------- tests


def test_every_cell_matches_its_json_in_latex_and_markdown(experiments):
    records, skipped = rt.load_records(experiments)
    tex_tables = parse_latex_tables(all_tex(records, skipped, experiments))
    md_tables = parse_markdown_tables(rt.render_markdown(records, skipped))
    seen_tex = check_tables(tex_tables, experiments.parent)
    seen_md = check_tables(md_tables, experiments.parent)
    expected = {(r.path, p) for r in records for p in numeric_leaves(r.record["metrics"])}
    assert seen_tex == expected  # every number of every record is in the paper, none invented
    assert seen_md == expected
    assert ("experiments/alignment/gsm8k.json", "summary.sft.accuracy") in expected
    assert ("experiments/bench/decode.json", "ours/b1/lat_ms") in expected


def test_special_layouts_are_used(experiments):
    records, _ = rt.load_records(experiments)
    by_area = {}
    for r in records:
        by_area.setdefault(r.area, []).append(r)
    wide = rt.tables_for_records(by_area["test_time"], "tt")
    assert len(wide) == 2 and all(len(t.columns) <= rt.MAX_COLS for t in wide)  # 7 columns -> 2 chunks
    sparse = rt.tables_for_records(by_area["ablations"], "ab")
    assert [t.long for t in sparse] == [True]  # 9 columns, mostly empty -> one row per metric
    assert len(sparse[0].rows) == 9 and sparse[0].rows[0].group == "g0.m0"
    bench = rt.tables_for_records(by_area["bench"], "b")[0]
    assert bench.columns == ["tok_s", "lat_ms"] and [r.group for r in bench.rows] == ["ours/b1/", "hf/b1/"]
    align = rt.tables_for_records(by_area["alignment"], "a")[0]
    assert [r.group for r in align.rows] == ["summary.base.", "summary.sft.", "summary.dpo+verifier."]


def test_not_yet_run_lines_follow_the_missing_records(experiments):
    records, _ = rt.load_records(experiments)
    by_key = {s.key: s for s in rt.SECTIONS}
    fin = rt.render_section_tex(by_key["finetuning"], records)
    assert fin.count(r"\notyetrun") == 2 and "finetune/" in fin and "prompting/" in fin
    pre = rt.render_section_tex(by_key["pretraining"], records)
    assert r"\notyetrun" not in pre and r"\begin{tabular}" in pre
    longc = rt.render_section_tex(by_key["long_context"], records)  # attention/ holds no valid record
    assert longc.count(r"\notyetrun") == 2
    md = rt.render_markdown(records)
    assert "_Not yet run: no record under experiments/analysis/" in md
    assert "_Not yet run: no record under experiments/lm/" not in md


def test_skipped_files_and_other_section(experiments):
    records, skipped = rt.load_records(experiments)
    assert {p for p, _ in skipped} == {
        "experiments/attention/raw_dump.json",
        "experiments/attention/broken.json",
        "experiments/alignment/seeds/run-seed0.json",
    }
    assert "intermediate result" in dict(skipped)["experiments/alignment/seeds/run-seed0.json"]
    other = rt.other_section(records)
    assert other is not None and other.areas == ("misc_area",)
    prov = rt.render_provenance_tex(records, skipped)
    assert f"from {len(records)} record file(s)" in prov and "raw\\_dump" in prov


def test_write_generated_replaces_stale_output(experiments, tmp_path):
    out = tmp_path / "gen"
    (experiments / "attention" / "sub").mkdir(parents=True)
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in ("layer_00", "sink_mass", "layer_01"):
        plt.figure(figsize=(1, 1))
        plt.savefig(experiments / "attention" / "sub" / f"{name}.png")
        plt.close()
    files = rt.write_generated(experiments, out)
    assert {p.name for p in files.figures} == {"attention-sub-sink-mass.png", "attention-sub-layer-00.png"}
    assert "1 further figure" in (out / "long_context.tex").read_text()
    (out / "stale.tex").write_text("old")
    (experiments / "lm" / "other_run.json").unlink()
    rt.write_generated(experiments, out)
    assert not (out / "stale.tex").exists()
    assert "lm-b" not in (out / "pretraining.tex").read_text()
    assert (out / "other.tex").read_text().startswith("% generated")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.412345, "0.4123"),
        (80.9, "80.90"),
        (471.0, "471.0"),
        (12345.67, "12346"),
        (-0.5, "-0.5000"),
        (0.00012345, "1.234e-04"),
        (2.5e7, "2.500e+07"),
        (0.0, "0"),
        (7, "7"),
        (9_800_000, "9800000"),
    ],
)
def test_format_number(value, text):
    assert rt.format_number(value) == text


def test_tex_escape_round_trips_specials():
    raw = r"a_b & c% $d #e {f} ~g ^h \i"
    assert untex(rt.tex_escape(raw)) == raw
    assert untex(rt.tex_code("x/y.z-w_v")) == "x/y.z-w_v"
    assert rt.tex_escape("±é") == r"$\pm$?"


def test_real_experiments_folder_round_trips():
    root = REPO_ROOT / "experiments"
    records, skipped = rt.load_records(root)
    if not records:
        pytest.skip("no result records under experiments/ yet")
    tex_tables = parse_latex_tables(all_tex(records, skipped, root))
    md_tables = parse_markdown_tables(rt.render_markdown(records, skipped))
    expected = {(r.path, p) for r in records for p in numeric_leaves(r.record["metrics"])}
    assert check_tables(tex_tables, REPO_ROOT) == expected
    assert check_tables(md_tables, REPO_ROOT) == expected


def test_generated_latex_compiles(experiments, tmp_path):
    """Every generated section (awkward names, keys and protocol fields included) typesets with the report's
    style file. Skips without pdflatex (the build script installs it; the other tests need no TeX)."""
    kpse = shutil.which("kpsewhich")
    found = kpse and subprocess.run([kpse, "booktabs.sty"], capture_output=True, text=True).stdout.strip()
    if shutil.which("pdflatex") is None or not found:
        pytest.skip("pdflatex not installed (python scripts/build_report.py installs it)")
    build = tmp_path / "build"
    files = rt.write_generated(experiments, build / "generated")
    shutil.copyfile(REPO_ROOT / "report" / "modernllm.sty", build / "modernllm.sty")
    body = "\n".join(rf"\input{{generated/{key}}}" for key in files.sections)
    (build / "t.tex").write_text(
        "\\documentclass[11pt,twocolumn]{article}\\usepackage{modernllm}\\graphicspath{{generated/}}\n"
        f"\\begin{{document}}\n{body}\n\\input{{generated/provenance}}\n\\end{{document}}\n"
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
        cwd=build,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (build / "t.pdf").stat().st_size > 1000


def test_figure_captions_name_the_nearest_records_only():
    from modern_llm.evaluation.report_tables import _nearest_records

    names = [f"run-{i}.json" for i in range(10)] + ["fig-a.json", "fig-a-tool.json"]
    caption = _nearest_records("fig-a-accuracy-vs-n", names, limit=3)
    assert caption.startswith("fig-a-tool.json, fig-a.json, ") and caption.endswith("and 9 more")
    assert _nearest_records("x", ["x.json"]) == "x.json"
