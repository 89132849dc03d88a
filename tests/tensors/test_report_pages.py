"""The report's building blocks: a page that escapes HTML and Markdown, and the plots' series styles."""

from __future__ import annotations

from ebft.report import Page


def test_page_escapes_html() -> None:
    page = Page("a <b>")
    page.table(["x|y"], [["`<code>`"]])
    assert "a &lt;b&gt;" in page.to_html() and "<code>&lt;code&gt;</code>" in page.to_html()
    assert "| x\\|y |" in page.to_markdown()


def test_perplexity_plot_styles_one_colour_per_pruner_one_line_style_per_method() -> None:
    from ebft.plots import series_styles

    labels = ["magnitude", "magnitude + ebft", "wanda", "wanda + ebft", "wanda + lora", "sparsegpt + lora"]
    assert series_styles(labels) == {
        "magnitude": (0, "--"),
        "magnitude + ebft": (0, "-"),
        "wanda": (1, "--"),
        "wanda + ebft": (1, "-"),
        "wanda + lora": (1, ":"),
        "sparsegpt + lora": (2, ":"),
    }
