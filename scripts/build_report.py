"""Build the report PDF with one command:  python scripts/build_report.py   (``make report`` calls it).

Steps
1. ``modern_llm.evaluation.report_tables.write_generated``: every record under ``experiments/`` becomes LaTeX
   tables with source notes, figures are copied, missing results become "not yet run" lines
   (``report/build/generated/``; the same tables as Markdown in ``generated/results.md``).
2. ``report/paper.tex``, ``modernllm.sty`` and ``references.bib`` are copied into ``report/build/``.
3. A TeX toolchain is found or installed: pdflatex + bibtex from the Debian packages texlive-latex-base,
   texlive-latex-recommended and texlive-fonts-recommended (about 150 MB; texlive-latex-extra is NOT needed,
   the style file avoids it). Installing needs root and apt-get; otherwise the error says what to install.
4. pdflatex, bibtex, pdflatex, pdflatex (citations and cross-references resolved), halting on the first
   TeX error with the end of the log printed. The PDF is copied to ``report/paper.pdf`` when under 2 MB.

This lives in scripts/ rather than the package because it builds a repository folder (report/) and may
install system packages; the table rendering it calls is the package's, and is tested without TeX.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEX_PACKAGES = ("texlive-latex-base", "texlive-latex-recommended", "texlive-fonts-recommended")
# files the style needs; if kpsewhich cannot find one, the toolchain is incomplete
REQUIRED_TEX_FILES = (
    "article.cls",
    "geometry.sty",
    "mathptmx.sty",
    "helvet.sty",
    "courier.sty",
    "microtype.sty",
    "booktabs.sty",
    "caption.sty",
    "natbib.sty",
    "plainnat.bst",
    "hyperref.sty",
    "xcolor.sty",
    "graphicx.sty",
    "amsmath.sty",
)
SOURCES = ("paper.tex", "modernllm.sty", "references.bib")
MAX_COMMITTED_PDF_BYTES = 2 * 1024 * 1024


def missing_tex_parts() -> list[str]:
    """Programs or TeX files that are not available (empty list = ready to build)."""
    missing = [prog for prog in ("pdflatex", "bibtex", "kpsewhich") if shutil.which(prog) is None]
    if "kpsewhich" in missing:
        return missing + list(REQUIRED_TEX_FILES)
    for name in REQUIRED_TEX_FILES:
        found = subprocess.run(["kpsewhich", name], capture_output=True, text=True).stdout.strip()
        if not found:
            missing.append(name)
    return missing


def install_tex() -> None:
    """apt-get install the Debian TeX packages (root only); raise with the manual command otherwise."""
    command = ["apt-get", "install", "-y", "--no-install-recommends", *TEX_PACKAGES]
    manual = "sudo " + " ".join(command)
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"no TeX toolchain and no apt-get: install pdflatex + bibtex (e.g. {manual})")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise RuntimeError(f"no complete TeX toolchain; install it once with: {manual}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(TEX_PACKAGES)} ...", flush=True)
    if subprocess.run(command, env=env).returncode != 0:  # stale package lists: update once and retry
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(command, env=env, check=True)


def ensure_tex(allow_install: bool) -> None:
    missing = missing_tex_parts()
    if not missing:
        return
    if not allow_install:
        raise RuntimeError(f"TeX toolchain incomplete (missing {missing}); rerun without --no-install")
    install_tex()
    still = missing_tex_parts()
    if still:
        raise RuntimeError(f"TeX toolchain still incomplete after installing {TEX_PACKAGES}: {still}")


def run_tex(build_dir: Path, args: list[str]) -> None:
    """Run one TeX program in ``build_dir``; on failure show the end of its log and raise."""
    proc = subprocess.run(args, cwd=build_dir, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        log_file = build_dir / ("paper.blg" if args[0] == "bibtex" else "paper.log")
        tail = log_file.read_text(errors="replace")[-4000:] if log_file.is_file() else proc.stdout[-4000:]
        raise RuntimeError(
            f"{' '.join(args)} failed (exit {proc.returncode}); end of {log_file.name}:\n{tail}"
        )


def log_warnings(build_dir: Path) -> list[str]:
    log = (build_dir / "paper.log").read_text(errors="replace")
    keys = ("undefined", "Overfull \\hbox", "Float too large", "Rerun to get")
    return [line for line in log.splitlines() if any(k in line for k in keys)]


def build(experiments: Path, build_dir: Path, allow_install: bool, copy_to: Path | None) -> Path:
    sys.path.insert(0, str(REPO / "src"))  # works from a plain checkout too
    from modern_llm.evaluation.report_tables import write_generated

    build_dir.mkdir(parents=True, exist_ok=True)
    files = write_generated(experiments, build_dir / "generated")
    print(
        f"generated {len(files.sections)} section files and {len(files.figures)} figures from {experiments}"
    )
    for name in SOURCES:
        shutil.copyfile(REPO / "report" / name, build_dir / name)
    ensure_tex(allow_install)
    latex = ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"]
    run_tex(build_dir, latex)
    run_tex(build_dir, ["bibtex", "paper"])
    run_tex(build_dir, latex)
    run_tex(build_dir, latex)
    pdf = build_dir / "paper.pdf"
    warnings = log_warnings(build_dir)
    if warnings:
        print(f"{len(warnings)} LaTeX warning(s), e.g.: {warnings[0].strip()}")
    if copy_to is not None:
        if pdf.stat().st_size <= MAX_COMMITTED_PDF_BYTES:
            shutil.copyfile(pdf, copy_to)
            print(f"copied to {copy_to}")
        else:
            print(f"not copied to {copy_to}: {pdf.stat().st_size} bytes > 2 MB")
    return pdf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_report.py",
        description="Render experiments/ records into report/paper.tex's tables and build the PDF "
        "(installs the Debian TeX packages when missing and running as root).",
    )
    parser.add_argument("--experiments", type=Path, default=REPO / "experiments", help="records root")
    parser.add_argument("--build-dir", type=Path, default=REPO / "report" / "build", help="build folder")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install TeX; fail instead")
    parser.add_argument(
        "--no-copy",
        action="store_true",
        help="do not copy the PDF to report/paper.pdf (kept in the build dir)",
    )
    args = parser.parse_args(argv)
    try:
        pdf = build(
            args.experiments.resolve(),
            args.build_dir.resolve(),
            allow_install=not args.no_install,
            copy_to=None if args.no_copy else REPO / "report" / "paper.pdf",
        )
    except RuntimeError as err:
        print(f"build_report: {err}", file=sys.stderr)
        return 1
    print(f"PDF: {pdf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
