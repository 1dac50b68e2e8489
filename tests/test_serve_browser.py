"""The page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright): upload, labels, chart,
all under the server's Content-Security-Policy (no inline script or style)."""

import os
import shutil
from pathlib import Path

import pytest
import tiny_run
from test_serve import ENV, SERVE, photo_with_a_face

from agejax.serving import local

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, compilation_cache):
  """A server of the session's tiny trained workdir."""
  _, workdir = tiny_run.tiny_run(request, tmp_path_factory)
  # One photo at a time: one worker a lane and small batches start in 18 s where the defaults take 31.
  flags = ["--workdir", str(workdir), f"--compilation_cache_dir={compilation_cache}"]
  flags += ["--workers=1", "--aligned_workers=1", "--max_batch=4"]
  with local.LocalServer(SERVE, flags, env=ENV) as running:
    yield running


def test_the_page_boxes_the_face_labels_its_age_and_charts_its_distribution(server, tmp_path):
  import httpx
  from playwright.sync_api import expect, sync_playwright

  assert CHROMIUM, "this test needs Debian's chromium: apt-get install chromium (.ci/run installs it)"

  image, _ = photo_with_a_face(900, 600, at=(380, 200))
  photo = tmp_path / "astronaut.png"
  photo.write_bytes(image)
  # Root (CI containers) cannot use Chromium's sandbox; the page is our own, served on loopback.
  args = ["--no-sandbox"] if os.geteuid() == 0 else []
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True, timeout=60_000)
    try:
      page = browser.new_page(viewport={"width": 1100, "height": 700})
      page.set_default_timeout(60_000)
      # Anything the page's Content-Security-Policy blocks (an inline script or style, another origin) is
      # recorded: the page must work under it untouched.
      page.add_init_script(
        "window.cspViolations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
      )
      errors = []
      page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
      response = page.goto(server.url + "/")
      headers = response.headers
      assert "script-src 'self'" in headers["content-security-policy"]
      assert "frame-ancestors 'none'" in headers["content-security-policy"]
      assert "unsafe-inline" not in headers["content-security-policy"]
      assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
      page.set_input_files("#files", str(photo))
      label = page.locator(".age-label").first
      expect(label).to_contain_text("Face 1: age ")
      chart = page.locator("svg.chart").first
      expect(chart).to_be_visible()
      assert chart.locator("rect.bar").count() == 100  # one bar per age bin, 1..100
      assert page.locator("canvas").count() == 1
      age = float(label.inner_text().split("age ")[1].split()[0])
      api = httpx.post(
        server.url + "/v1/predict", files={"files": ("astronaut.png", image)}, params={"under": "18"}, timeout=60
      ).json()
      (face,) = api["results"][0]["faces"]
      assert age == pytest.approx(face["age"], abs=0.051)  # the page shows one decimal
      # P(age < 18) as the API answers it: shown in percent, and kept whole in the element's data-p.
      under = label.locator(".p-under")
      assert float(under.get_attribute("data-p")) == pytest.approx(face["p_under"]["18"], abs=1e-6)
      assert under.inner_text() == f"P(age < 18) {100 * face['p_under']['18']:.1f}%"
      # argmax_age is the distribution's peak, not the prediction: the page names it so.
      assert f"peak {face['argmax_age']:.0f} " in label.inner_text() and "likely" not in label.inner_text()
      # The face box: one per face, in the photo's pixels as the API gives it, and on screen where
      # the face is on the displayed photo.
      boxes = page.locator("svg.boxes rect.face-box")
      assert boxes.count() == 1
      drawn = [float(boxes.first.get_attribute(k)) for k in ("x", "y", "width", "height")]
      assert drawn == pytest.approx(face["box"], abs=1e-6)
      photo_on_screen = page.locator("canvas").first.bounding_box()
      on_screen = boxes.first.bounding_box()
      half_line = float(boxes.first.get_attribute("stroke-width")) / 2  # the outline is centred on the box's edge
      shown = photo_on_screen["width"] / 900  # the displayed photo's size over the photo's (900 x 600)
      x, y, w, h = face["box"]
      assert on_screen["x"] + half_line - photo_on_screen["x"] == pytest.approx(x * shown, abs=1.0)
      assert on_screen["y"] + half_line - photo_on_screen["y"] == pytest.approx(y * shown, abs=1.0)
      assert on_screen["width"] - 2 * half_line == pytest.approx(w * shown, abs=1.0)
      assert on_screen["height"] - 2 * half_line == pytest.approx(h * shown, abs=1.0)
      assert page.evaluate("window.cspViolations") == []
      assert not [e for e in errors if "Content Security Policy" in e], errors
      screenshot = Path(tmp_path) / "page.png"
      page.screenshot(path=str(screenshot), full_page=True)
      assert screenshot.stat().st_size > 10_000
    finally:
      browser.close()
