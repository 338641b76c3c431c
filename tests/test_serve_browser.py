"""The page at ``/`` in a real headless Chromium (Selenium + the system's chromedriver).

Needs the system packages ``chromium`` and ``chromium-driver`` (Debian: ``apt-get install -y chromium
chromium-driver``); without them this test fails, it does not skip. Uploads a generated image, checks that
the page drew exactly the detections ``POST /v1/detect`` returns for it, and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import httpx
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_serve import ServerProcess

from paadet.data.synthetic import synthetic_image
from paadet.model.seeded import seeded_state_dict


def find(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        f"none of {names} on PATH: install the system packages (Debian: apt-get install -y chromium chromium-driver)"
    )


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = find("chromium", "chromium-browser", "google-chrome")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(find("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_draws_the_detections_of_the_api(tmp_path: Path, browser) -> None:
    checkpoint = tmp_path / "seeded.pth"
    torch.save({"meta": {}, "state_dict": seeded_state_dict(2, cls_bias=-10.3)}, checkpoint)
    image = tmp_path / "upload.png"
    cv2.imwrite(str(image), synthetic_image(150, 120, seed=1))
    srv = ServerProcess(["--checkpoint", str(checkpoint), "--preset", "mmdet"], log=tmp_path / "server.log")
    try:
        api = httpx.post(srv.url + "/v1/detect", content=image.read_bytes(), timeout=60).json()
        assert len(api["detections"]) >= 2, "the check needs detections to draw"
        browser.get(srv.url + "/")
        browser.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        )
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", browser.find_element(
            By.ID, "status"
        ).text

        def set_threshold(value: float) -> list[dict]:
            browser.execute_script(
                "const s = document.getElementById('thr'); s.value = arguments[0];s.dispatchEvent(new Event('input'));",
                str(value),
            )
            return json.loads(browser.find_element(By.ID, "drawn").get_attribute("data-boxes"))

        def canvas_pixels() -> str:
            return browser.execute_script("return document.getElementById('canvas').toDataURL('image/png');")

        none_drawn = set_threshold(1.0)
        plain = canvas_pixels()
        assert none_drawn == [] and browser.find_element(By.ID, "drawn-count").text == "0"

        drawn = set_threshold(0.0)
        assert browser.find_element(By.ID, "drawn-count").text == str(len(api["detections"]))
        assert browser.find_element(By.ID, "total-count").text == str(len(api["detections"]))
        assert drawn == [{"bbox": d["bbox"], "score": d["score"], "label": d["label"]} for d in api["detections"]]
        assert canvas_pixels() != plain, "boxes were listed but nothing was drawn on the canvas"
        size = browser.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height];")
        assert size == [api["width"], api["height"]]

        thr = round(api["detections"][len(api["detections"]) // 2]["score"], 2)  # the slider's step is 0.01
        assert len(set_threshold(thr)) == sum(d["score"] >= thr for d in api["detections"])
        timings = browser.find_element(By.ID, "timings").text
        assert "network" in timings and "round trip" in timings

        set_threshold(0.0)
        shot = Path(os.environ.get("PAADET_SCREENSHOT_DIR", tmp_path)) / "serve_page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        print(f"screenshot: {shot}")
    finally:
        assert srv.stop() == 0, srv.output()
