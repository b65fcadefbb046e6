"""The demo page's "Show where each model looks" switch, end to end in Debian's Chromium."""

from __future__ import annotations

import io
import os

from PIL import Image

from tests.conftest import IMAGES, ROOT, SCREENSHOTS
from tests.test_page import pytestmark as page_marks

pytestmark = page_marks

MODELS = ["alexnet", "resnet18", "cifar10_resnet20", "cifar10_resnet56"]  # page order
DOCS_PICTURE = ROOT / "docs" / "explain-compare.png"


def _compare_with_overlays(page, url: str, models: list[str]) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#model-groups[aria-busy=false]")
    page.set_input_files("#file-input", str(IMAGES / "chelsea.png"))
    page.wait_for_selector("#preview:not([hidden])")
    for box in page.query_selector_all("input[name=models]:checked"):
        box.uncheck()
    for m in models:
        page.check(f"input[name=models][value='{m}']")
    page.check("#explain-toggle")
    page.click("#compare-btn")
    page.wait_for_selector(f".card[data-model='{models[-1]}'] .cam-overlay")


def _docs_picture(page) -> None:
    """The two real pretrained CIFAR-10 ResNets' cards (the other models here have random
    weights), as a palette PNG small enough for the README."""
    page.mouse.move(0, 0)  # no card hovered: every overlay shown
    page.wait_for_function(
        "[...document.querySelectorAll('.cam-overlay')]"
        ".every(i => getComputedStyle(i).opacity === '1')"
    )
    boxes = [page.locator(f".card[data-model='{m}']").bounding_box() for m in MODELS[2:]]
    x0, y0 = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
    x1 = max(b["x"] + b["width"] for b in boxes)
    y1 = max(b["y"] + b["height"] for b in boxes)
    shot = page.screenshot(clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    Image.open(io.BytesIO(shot)).convert("RGB").quantize(256).save(DOCS_PICTURE, optimize=True)


def test_switch_shows_an_overlay_per_card_and_a_click_toggles_it(browser, service) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    _compare_with_overlays(page, service.url, MODELS)
    cards = page.query_selector_all(".card")
    assert [c.get_attribute("data-model") for c in cards] == MODELS
    page.wait_for_function(
        f"document.querySelectorAll('.card .cam-overlay').length === {len(MODELS)}"
    )
    page.wait_for_function(
        f"""[...document.querySelectorAll('.card .cam-overlay')]
             .filter(i => i.complete && i.naturalWidth > 0).length === {len(MODELS)}"""
    )
    # the overlay is the model's own input size: 224 px crops, 32 px CIFAR squashes
    sizes = page.evaluate(
        "[...document.querySelectorAll('.card .cam-overlay')].map(i => i.naturalWidth)"
    )
    assert sizes == [224, 224, 32, 32]
    # predictions first, then the picture, in each card
    order = page.evaluate(
        """[...document.querySelectorAll('.card')].map(c =>
             !!(c.querySelector('.preds').compareDocumentPosition(c.querySelector('.cam'))
                & Node.DOCUMENT_POSITION_FOLLOWING))"""
    )
    assert order == [True] * len(MODELS)
    page.screenshot(path=str(SCREENSHOTS / "explain-compare.png"), full_page=True)
    cam = page.query_selector(".card[data-model='cifar10_resnet56'] .cam")
    assert cam.get_attribute("data-showing") == "overlay"
    cam.click()
    assert cam.get_attribute("data-showing") == "original"
    assert cam.get_attribute("aria-pressed") == "true"
    page.mouse.move(0, 0)  # off the card: the pinned original stays
    # the overlay fades out (a 0.15 s transition) and stays out
    page.wait_for_function(
        """getComputedStyle(document.querySelector(
             ".card[data-model='cifar10_resnet56'] .cam-overlay")).opacity === '0'"""
    )
    cam.click()
    assert cam.get_attribute("data-showing") == "overlay"
    if os.environ.get("IMGCLS_WRITE_DOCS_PICTURE"):  # refresh the README's picture on request
        _docs_picture(page)
    context.close()


def test_overlays_at_phone_width(browser, service) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True)
    page = context.new_page()
    _compare_with_overlays(page, service.url, ["resnet18", "cifar10_resnet56"])
    page.wait_for_function(
        """[...document.querySelectorAll('.card .cam-overlay')]
             .filter(i => i.complete && i.naturalWidth > 0).length === 2"""
    )
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    cam = page.query_selector(".card[data-model='resnet18'] .cam")
    cam.tap()
    assert cam.get_attribute("data-showing") == "original"
    page.screenshot(path=str(SCREENSHOTS / "explain-phone.png"), full_page=True)
    context.close()


def test_classify_with_the_switch_shows_one_overlay(browser, service) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(service.url + "/")
    page.wait_for_selector("#model-groups[aria-busy=false]")
    page.set_input_files("#file-input", str(IMAGES / "coffee.png"))
    for box in page.query_selector_all("input[name=models]:checked"):
        box.uncheck()
    page.check("input[name=models][value='cifar10_resnet20']")
    page.check("#explain-toggle")
    page.click("#classify-btn")
    page.wait_for_selector(".card[data-model='cifar10_resnet20'] .cam-overlay")
    page.wait_for_function(
        "[...document.querySelectorAll('.card .cam-overlay')]"
        ".filter(i => i.complete && i.naturalWidth === 32).length === 1"
    )
    assert len(page.query_selector_all(".cam")) == 1
    context.close()
