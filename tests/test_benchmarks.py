"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` runs every figure and writes its report."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_suite_writes_every_figure_and_keeps_the_earlier_sections(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    end_mark = "<!-- end of run.py output: everything below is kept as is -->"
    out.write_text(f"# old\n\n<!-- fig 8 -->\nkept\n<!-- /fig 8 -->\n\n{end_mark}\n## Kept section\nfigure 42\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(out)],
                   check=True, env=env, cwd=ROOT, timeout=600)
    text = out.read_text()
    for n in [*range(1, 8), 9]:
        assert f"<!-- fig {n} -->" in text and f"<!-- /fig {n} -->" in text, f"figure {n} missing"
    assert "<!-- fig 8 -->\nkept\n<!-- /fig 8 -->" in text  # a section this invocation did not make is kept
    assert text.index(end_mark) > text.index("<!-- /fig 9 -->")
    assert text.endswith("## Kept section\nfigure 42\n")
    assert "torch " in text and "cores" in text and "--quick" in text
    assert re.search(r"Suite time of this invocation: \d+ s \(figure 1 \d+ s, .*figure 9 \d+ s\)", text)
    # Every timing table gives the baseline itself a ratio of exactly 1 and finite ratios elsewhere.
    ratios = [float(m) for m in re.findall(r"\| (\d+\.\d\d) \[\d+\.\d\d-\d+\.\d\d\] \|", text)]
    assert ratios and all(r > 0 for r in ratios)
    # The baseline row of each timing table (figures 1, 2, 3, 7; --quick times figure 1 at one thread only)
    # comes first and is 1 to itself.
    baselines = re.findall(r"\| variant \| median s \| x (.+?): median .*\n.*\n\| (.+?) \| [^|]+ \| (.+?) \|", text)
    assert len(baselines) == 4
    assert all(name == first and cell == "1.00 [1.00-1.00]" for name, first, cell in baselines)
