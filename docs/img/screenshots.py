"""Re-make the README's screenshots: python docs/img/screenshots.py RUN_DIR [RUN_DIR...]

The report of the given runs and the `gptforge serve` page of the first one (after a prompt has
streamed in), each taken in headless Chromium and saved as a small palette PNG next to this file.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))
from browser import CHROMIUM_FLAGS, chromium_paths  # noqa: E402


def shrink(path: Path) -> None:
    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def main(runs: list[str], source: str | None = None) -> None:
    chromium, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp()}"]:
        options.add_argument(flag)
    options.add_argument("--window-size=1000,1300")
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    server = None
    try:
        report = Path(tempfile.mkdtemp()) / "report.html"
        subprocess.run([sys.executable, "-m", "gptforge", "report", *runs, "--out", str(report)], check=True)
        chrome.get(report.as_uri())
        chrome.save_screenshot(str(HERE / "report.png"))

        server = subprocess.Popen([sys.executable, "-u", "-m", "gptforge", "serve", source or runs[0], "--port", "0",
                                   "--device", "cpu"], stdout=subprocess.PIPE, text=True)
        url = next(m.group(0) for line in server.stdout if (m := re.search(r"http://[0-9.:]+/", line)))
        chrome.set_window_size(1000, 620)
        chrome.get(url)
        prompt = chrome.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("The class")
        chrome.find_element(By.ID, "generate").click()
        WebDriverWait(chrome, 60).until(lambda c: c.find_element(By.ID, "output").get_attribute("data-done") == "true")
        chrome.save_screenshot(str(HERE / "serve.png"))
    finally:
        chrome.quit()
        if server:
            server.terminate()
    for name in ("report.png", "serve.png"):
        shrink(HERE / name)
        print(HERE / name, (HERE / name).stat().st_size // 1000, "KB")


if __name__ == "__main__":
    main(sys.argv[1:])  # the page serves the first run's newest checkpoint
