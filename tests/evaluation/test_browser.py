"""report.html and the compare page in a real browser (headless Chromium): what a person sees.

Chromium is Debian's `chromium` package (`apt-get install -y chromium`); the tests skip when it is
missing, and fail instead when RETAIN_REQUIRE_BROWSER=1 (CI, where the setup installs it).
Nothing is downloaded: Chromium opens the pages from disk and prints the DOM after the page's
script ran (`--dump-dom`) or a PNG (`--screenshot`); its console goes to stderr (`--enable-logging`).
The prediction browser keeps its filter in the URL hash, so a URL drives it. A probe script, appended to a
copy of the page, writes what is laid out on screen (size and visibility of the heatmap, the metrics
table, the prediction rows) into the DOM.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.evaluation.html_compare import write_compare_html
from retain.evaluation.html_report import CORRECT_AT, write_html_report
from retain.evaluation.report import build_results
from retain.evaluation.svg import viridis

from ..helpers import tiny_config

CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
)
MISSING = "no chromium on PATH; install Debian's package: apt-get install -y chromium"
if CHROMIUM is None and os.environ.get("RETAIN_REQUIRE_BROWSER") == "1":
    raise RuntimeError(MISSING + " (RETAIN_REQUIRE_BROWSER=1 asks for the browser tests to run)")
# One worker runs them all: the tiny run they share is made once.
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason=MISSING), pytest.mark.xdist_group("browser")]
TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]
PROBE = """<script>
(function () {
  function seen(selector) {
    var el = document.querySelector(selector);
    if (!el) return false;
    var box = el.getBoundingClientRect(), style = getComputedStyle(el);
    return box.width > 20 && box.height > 20 && style.visibility !== "hidden" && style.display !== "none";
  }
  var rows = document.querySelectorAll("#prediction-table tbody tr");
  var out = { heatmap: seen("svg.heatmap"), metrics: seen("#metrics"), loss: seen("#loss svg"),
    scatter: seen("svg.scatter"), rows: rows.length, shown: Array.prototype.filter.call(rows, function (r) {
      return r.getBoundingClientRect().height > 0; }).length,
    tasks: Array.prototype.map.call(rows, function (r) { return r.cells[1].textContent; }),
    count: (document.getElementById("pred-count") || {}).textContent || "", title: document.title };
  var pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def chromium(*args: str, profile) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to the console (errors included), from Chromium's log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def open_page(page, tmp_path, fragment: str = "") -> tuple[dict, list[str]]:
    """(what the probe saw, console lines) of `page` opened in Chromium at `#fragment`."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body></html>", PROBE + "</body></html>"))
    # The copy must sit where the page is, for its relative links; so it is named apart, not moved.
    target = page.parent / probed.name
    if target != probed:
        shutil.copy(probed, target)
    done = chromium(
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        f"{target.as_uri()}#{fragment}",
        profile=tmp_path / "p",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert match, "the probe did not run: the page's script failed before it?\n" + done.stderr[-2000:]
    return json.loads(match.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")), (
        console_lines(done.stderr)
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 3-task ewc run on the tiny random model (ewc: a method with a loss of its own)."""
    folder = tmp_path_factory.mktemp("browser")
    raw = tiny_config(folder, "ewc", stream={"tasks": TASKS})
    results = run_experiment(config_from_dict(raw))
    return folder / "run", results


def records(run_dir) -> list[dict]:
    page = (run_dir / "report.html").read_text()
    data = re.search(r'<script type="application/json" id="prediction-data">(.*?)</script>', page, re.S)
    return json.loads(data.group(1))["records"]


def test_report_seen_in_browser(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    seen, console = open_page(run_dir / "report.html", tmp_path)
    assert console == []  # no errors (and no logging) in the console
    assert seen["heatmap"] and seen["metrics"] and seen["loss"]
    total = len(records(run_dir))
    assert total == 4 * 3 * 6  # 4 rows x 3 tasks x 6 test examples
    assert seen["rows"] == seen["shown"] == total
    assert seen["count"].startswith(f"{total} of {total} predictions match")


@pytest.mark.parametrize(
    "fragment",
    [
        "task=parity&correct=0",
        "task=max_number&correct=1",
        "row=3",
        "q=capital",
        "row=0&task=capital_letters",
    ],
)
def test_prediction_filter_changes_rows(tiny_run, tmp_path, fragment):
    run_dir, _ = tiny_run
    want = dict(pair.split("=") for pair in fragment.split("&"))
    expected = [
        r
        for r in records(run_dir)
        if ("row" not in want or str(r["r"]) == want["row"])
        and ("task" not in want or r["t"] == want["task"])
        and ("correct" not in want or (r["s"] >= CORRECT_AT) == (want["correct"] == "1"))
        and ("q" not in want or want["q"] in (r["p"] + r["y"] + r["ref"]).lower())
    ]
    seen, console = open_page(run_dir / "report.html", tmp_path, fragment)
    assert console == []
    assert seen["rows"] == seen["shown"] == len(expected) < len(records(run_dir))
    assert seen["tasks"] == [r["t"] for r in expected]
    assert seen["count"].startswith(f"{len(expected)} of ")


def test_screenshot_is_not_blank(tiny_run, tmp_path):
    """The screenshot shows the page: many colours, and the heatmap cells in their viridis colours."""
    run_dir, results = tiny_run
    shot = tmp_path / "report.png"
    done = chromium(
        "--hide-scrollbars",
        "--window-size=1280,1400",
        f"--screenshot={shot}",
        (run_dir / "report.html").as_uri(),
        profile=tmp_path / "p",
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 200
    present = {"#{:02x}{:02x}{:02x}".format(*rgb) for _, rgb in colours}
    cells = {viridis(v) for row in results["matrix"] for v in row}
    assert cells <= present, f"heatmap colours missing from the screenshot: {cells - present}"


def test_compare_page_seen_in_browser(tiny_run, tmp_path):
    """Two seeds of one setting (grouped as mean ± std) and another setting, side by side."""
    run_dir, results = tiny_run
    dirs = []
    for name, seed, shift in (("a-seed1", 1, 0.0), ("a-seed2", 2, -0.1), ("b", 1, 0.05)):
        folder = tmp_path / name
        folder.mkdir()
        config = (run_dir / "config.yaml").read_text().replace("seed: 3", f"seed: {seed}")
        if name == "b":
            config = config.replace("learning_rate: 0.02", "learning_rate: 0.01")
        (folder / "config.yaml").write_text(config)
        matrix = [[min(1.0, max(0.0, v + shift)) for v in row] for row in results["matrix"]]
        (folder / "results.json").write_text(json.dumps({**results, "matrix": matrix}))
        dirs.append(str(folder))
    page = write_compare_html(dirs, tmp_path / "compare.html")
    text = page.read_text()
    assert "±" in text and text.count('class="chart heatmap"') == 2
    seen, console = open_page(page, tmp_path)
    assert console == []
    assert seen["metrics"] and seen["heatmap"] and seen["scatter"]


def test_script_in_a_prompt_stays_text(tmp_path):
    """A prompt holding `</script><script>...` shows as text in the browser and runs nothing."""
    folder = tmp_path / "run"
    (folder / "eval" / "1").mkdir(parents=True)
    attack = "</script><script>document.title='pwned'</script><b>bold?</b>"
    record = {
        "prompt": [{"role": "user", "content": attack}],
        "prediction": attack,
        "reference": "x",
        "score": 0,
    }
    (folder / "eval" / "1" / "t.jsonl").write_text(json.dumps(record) + "\n")
    write_html_report(folder, build_results(["t"], [[0.0], [0.0]], "sequential", {}))
    seen, console = open_page(folder / "report.html", tmp_path)
    assert console == [] and seen["title"] == "retain report: sequential"
    assert seen["rows"] == 1
    dom = chromium("--dump-dom", (folder / "report.html").as_uri(), profile=tmp_path / "p").stdout
    assert "&lt;/script&gt;&lt;script&gt;document.title='pwned'" in dom  # shown as text, in a cell
