"""The HTML reports: Jinja2 templates that extend one base, values escaped, shipped in a wheel."""

import fnmatch
import tomllib
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "<script>alert(1)</script>"


def test_validation_report_escapes_rows_and_extends_the_base():
    """A rejected row's markup shows as text; the counts and reasons are in the page."""
    from unitoken.data.validate import _html

    report = {"manifest": "/d/manifest.jsonl", "input_rows": 3, "clean_rows": 1, "rejected_rows": 2,
              "reject_fraction": 2 / 3, "reasons": {"duplicate": 1, "image:missing": 1},
              "expectations": [{"expectation": "expect_column_values_to_be_null", "reason": "duplicate",
                                "success": False, "unexpected_count": 1}]}
    page = _html(report, [(SimpleNamespace(line=2, raw=f'{{"x": "{SCRIPT}"}}'), ["duplicate"])])
    assert page.startswith("<!doctype html>") and "<title>Validation report</title>" in page
    assert SCRIPT not in page and "&lt;script&gt;" in page
    assert "66.67 %" in page and "<td>image:missing</td><td>1</td>" in page and 'class="bad"' in page


def test_evaluation_report_escapes_answers_and_prompts(monkeypatch):
    """A model's answer and a prompt are text, not markup; scores and held-out losses are shown."""
    from unitoken.eval import runner

    monkeypatch.setattr(runner, "_chart", lambda summary: "PNG")
    report = {"model": "/m", "suites": {"shapes-vqa": {"task": "understanding", "overall": 0.5, "chance": 0.25,
                                                       "n": 2, "categories": {"color": 0.5}}},
              "heldout": {"tokens": "/p", "split": "test",
                          "understanding": {"mean": 0.1234, "n": 3, "categories": {"synth-vqa": 0.1}}}}
    items = [{"id": "q1", "category": "color", "answer": "red", "prediction": SCRIPT, "score": 0},
             {"id": "g1", "category": "single", "image": "images/g1.png", "prompt": f"a {SCRIPT}", "reason": "ok",
              "score": 1}]
    page = runner.render_html(report, items, Path("."))
    assert page.startswith("<!doctype html>") and "<title>Evaluation</title>" in page
    assert SCRIPT not in page and page.count("&lt;script&gt;") == 2
    assert "0.5000" in page and "synth-vqa 0.100" in page and "data:image/png;base64,PNG" in page
    assert page.count("<figure") == 1


def test_every_template_is_package_data():
    """A non-editable install ships the templates: pyproject's package-data covers each one."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["unitoken"]
    templates = sorted(p.relative_to(ROOT / "unitoken").as_posix() for p in (ROOT / "unitoken" / "templates").iterdir())
    assert "templates/base.html.j2" in templates
    assert all(any(fnmatch.fnmatch(t, pat) for pat in patterns) for t in templates)
