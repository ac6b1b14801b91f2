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
FIGURES_PER_MODEL = 6  # logit lens, residual patching, component patching, attribution, circuit, faithfulness


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return run_demo(DEFAULT_MODELS, out, quiet=True)
    finally:
        torch.set_num_threads(threads)


def table_rows(html: str, table_id: str) -> list[list[str]]:
    found = re.search(rf'<table id="{re.escape(table_id)}".*?</table>', html, re.S)
    assert found, f"the report has no table {table_id!r}"
    rows = re.findall(r"<tr.*?>(.*?)</tr>", found.group(0), re.S)
    return [re.findall(r"<t[dh].*?>(.*?)</t[dh]>", row, re.S) for row in rows]


def summary_rows(html: str) -> list[list[str]]:
    return table_rows(html, "summary-table")


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


def test_report_has_a_circuit_section_per_model_agreeing_with_the_summary(report):
    """Each model's circuit section holds its edges and faithfulness curve; the summary's size is the
    smallest size in that curve keeping 80%, and its top edge is the edges table's first."""
    html = report.read_text()
    header, *body = summary_rows(html)
    levels = [row[header.index("circuit level")] for row in body]
    assert levels == ["head", "head", "head", "layer"]  # chosen from each model's component graph
    for row in body:
        source = row[header.index("model")]
        assert f'<h2 id="{source}-circuit">' in html
        edges_header, *edges = table_rows(html, f"{source}-circuit-edges")
        first = edges[0]
        assert first[edges_header.index("rank")] == "1"
        top = f"{first[edges_header.index('sender')]}-&gt;{first[edges_header.index('receiver')]}"
        assert row[header.index("top circuit edge")] == top
        curve_header, *curve = table_rows(html, f"{source}-circuit-faithfulness")
        normalized = {int(r[curve_header.index("k")]): float(r[curve_header.index("normalized")]) for r in curve}
        k = int(float(row[header.index("circuit edges for 80%")]))
        assert normalized[k] >= 0.8 > max(value for size, value in normalized.items() if size < k)
        assert k - 1 in normalized or k == 1  # the sizes below k were all tried


def test_gpt2_circuit_size_is_the_smallest_keeping_80_percent_by_plain_hooks(report):
    """zoo:gpt2's reported circuit size k, checked with plain torch hooks (tests/circuit_reference.py):
    keeping only the report's top k edges (every other edge carrying its corrupt write) keeps at least
    80% of the clean - corrupt logit difference, and keeping the top k - 1 keeps less."""
    from circuit_reference import all_edges, last_logits, record, run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anylens.zoo import model_dir

    html = report.read_text()
    header, *body = summary_rows(html)
    row = next(r for r in body if r[header.index("model")] == "zoo:gpt2")
    k = int(float(row[header.index("circuit edges for 80%")]))
    edges_header, *edges = table_rows(html, "zoo:gpt2-circuit-edges")
    ranked = sorted(edges, key=lambda r: int(r[edges_header.index("rank")]))
    top = [(r[edges_header.index("sender")], r[edges_header.index("receiver")]) for r in ranked]
    assert k <= len(top)

    tokenizer = AutoTokenizer.from_pretrained(model_dir("gpt2"))
    hf = AutoModelForCausalLM.from_pretrained(model_dir("gpt2"), dtype=torch.float32).eval()
    pairs = demo_ioi_pairs(tokenizer)
    clean = torch.stack([tokenizer(p.clean, return_tensors="pt").input_ids[0] for p in pairs])
    corrupt = torch.stack([tokenizer(p.corrupt, return_tensors="pt").input_ids[0] for p in pairs])
    io = torch.tensor([tokenizer(p.answer, add_special_tokens=False).input_ids[0] for p in pairs])
    s = torch.tensor([tokenizer(p.distractor, add_special_tokens=False).input_ids[0] for p in pairs])

    def logit_diff(last: torch.Tensor, rows: slice) -> torch.Tensor:
        return last.gather(1, io[rows, None])[:, 0] - last.gather(1, s[rows, None])[:, 0]

    layers, heads = hf.config.n_layer, hf.config.n_head
    senders, receivers = ["embed"], ["logits"]
    for layer in range(layers):
        senders += [f"a{layer}.h{head}" for head in range(heads)] + [f"mlp{layer}"]
        receivers += [f"attn{layer}", f"mlp{layer}"]
    graph = all_edges(senders, receivers, layers, parallel=False)
    assert len(graph) == int(float(row[header.index("graph edges")]))
    sources = [record(hf, corrupt[p : p + 1]) for p in range(len(pairs))]

    def kept(n: int) -> float:
        keep = set(top[:n])
        ablated = [(sender, receiver, 1.0) for sender, receiver in graph if (sender, receiver) not in keep]
        values = [
            logit_diff(run(hf, clean[p : p + 1], ablated, sources[p]), slice(p, p + 1)) for p in range(len(pairs))
        ]
        return float(torch.cat(values).mean())

    clean_diff = float(logit_diff(last_logits(hf, clean), slice(None)).mean())
    corrupt_diff = float(logit_diff(last_logits(hf, corrupt), slice(None)).mean())
    normalized = {n: (kept(n) - corrupt_diff) / (clean_diff - corrupt_diff) for n in (k - 1, k)}
    assert normalized[k] >= 0.8 > normalized[k - 1], normalized


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


def test_small_models_run_on_one_thread_and_the_count_is_restored():
    from anylens.demo import _threads_for
    from anylens.testing import tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _threads_for(tiny("gpt2")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
