"""Headless Chromium through Selenium and Debian's chromedriver, for the tests that open a page."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,900"]


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or skip; in CI (CI set) a missing browser is a failure, not a skip."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "needs Debian's chromium and chromedriver: apt-get install chromium chromium-driver"
    if os.environ.get("CI"):
        pytest.fail(message + " (.ci/run installs them)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium with a fresh profile, closed after the module's tests."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = chromium_paths()
    profile = tempfile.mkdtemp(prefix="gptforge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()
        shutil.rmtree(profile, ignore_errors=True)
