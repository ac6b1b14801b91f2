"""The demo on the shipped zoo models, and its HTML report opened in a real (headless) browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from anylens.demo import DEFAULT_MODELS, demo_ioi_pairs, run_demo

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
]  # fmt: skip
FIGURES_PER_MODEL = 4


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return run_demo(DEFAULT_MODELS, out, quiet=True)
    finally:
        torch.set_num_threads(threads)


def summary_rows(html: str) -> list[list[str]]:
    table = re.search(r'<table id="summary-table".*?</table>', html, re.S).group(0)
    rows = re.findall(r"<tr.*?>(.*?)</tr>", table, re.S)
    return [re.findall(r"<t[dh].*?>(.*?)</t[dh]>", row, re.S) for row in rows]


def test_summary_table_lists_every_model_with_its_adapter(report):
    rows = summary_rows(report.read_text())
    header, body = rows[0], rows[1:]
    assert [row[header.index("model")] for row in body] == list(DEFAULT_MODELS)
    assert [row[header.index("adapter")] for row in body] == ["gpt2", "llama", "mistral", "mamba"]
    roles = [row[header.index("component role")] for row in body]
    assert roles == ["z", "z", "z", "mixer_out"]  # chosen from each model's roles


def test_summary_logit_differences_match_a_plain_forward(report):
    """The IOI numbers in the table, recomputed without anylens from the same prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anylens.zoo import model_dir

    rows = summary_rows(report.read_text())
    header = rows[0]
    for row in rows[1:]:
        name = row[header.index("model")].removeprefix("zoo:")
        tokenizer = AutoTokenizer.from_pretrained(model_dir(name))
        hf = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32).eval()
        pairs = demo_ioi_pairs(tokenizer)
        diffs = []
        for prompt_of in (lambda p: p.clean, lambda p: p.corrupt):
            ids = torch.stack([tokenizer(prompt_of(p), return_tensors="pt").input_ids[0] for p in pairs])
            with torch.no_grad():
                last = hf(ids).logits[:, -1]
            io = torch.tensor([tokenizer(p.answer, add_special_tokens=False).input_ids[0] for p in pairs])
            s = torch.tensor([tokenizer(p.distractor, add_special_tokens=False).input_ids[0] for p in pairs])
            diffs.append((last.gather(1, io[:, None]) - last.gather(1, s[:, None])).mean().item())
        assert float(row[header.index("IOI logit diff clean")]) == pytest.approx(diffs[0], rel=1e-2, abs=1e-2)
        assert float(row[header.index("IOI logit diff corrupt")]) == pytest.approx(diffs[1], rel=1e-2, abs=1e-2)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_chromium_with_every_heatmap_loaded(report, tmp_path):
    html = report.read_text()
    n_images = html.count('<img class="heatmap"')
    assert n_images == FIGURES_PER_MODEL * len(DEFAULT_MODELS)
    # The browser reports what it rendered: every image's decoded size, and the table's first column.
    probe = """<script>window.addEventListener('load', () => {
      const images = [...document.querySelectorAll('img.heatmap')].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
      const models = [...document.querySelectorAll('#summary-table tbody tr')].map(r => r.cells[0].textContent);
      const out = document.createElement('pre'); out.id = 'probe';
      out.textContent = JSON.stringify({images, models}); document.body.appendChild(out);
    });</script></body>"""
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", probe, 1), encoding="utf-8")
    common = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page did not run its load handler; chromium said: {dom.stderr[-2000:]}"
    state = json.loads(found.group(1).replace("&quot;", '"'))
    assert state["models"] == list(DEFAULT_MODELS)
    assert len(state["images"]) == n_images
    for complete, width, height in state["images"]:
        assert complete and width > 0 and height > 0

    screenshot = tmp_path / "report.png"
    subprocess.run(
        [*common, "--window-size=1280,2400", f"--screenshot={screenshot}", report.resolve().as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert screenshot.stat().st_size > 10_000
    shutil.copy(screenshot, report.parent / "report.png")  # kept next to the report for a person to look at
