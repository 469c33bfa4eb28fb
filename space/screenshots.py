"""Screenshots of the Space in headless Chromium, for the docs: `python space/screenshots.py EXPORT [EXPORT ...]`.

Serves the app on the given export folders (what `OSCQ_MODELS` would name), classifies the first example of the first
family's dataset, and writes `docs/space_classify.png` and `docs/space_accuracy.png` (or into `--out`). Needs
Chromium, chromedriver (Debian: `apt-get install chromium chromium-driver`) and `pip install selenium`.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _browser(profile: Path, width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def take(exports: list[str], out: Path, width: int = 1400, height: int = 1150) -> list[Path]:
    """Serves the Space on `exports` and writes the Classify and Accuracy screenshots into `out`."""
    import app
    from oscq_space.families import load_families
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    families, problems = load_families(exports)
    demo = app.build_demo(families, problems)
    port = _free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as profile:
        driver = _browser(Path(profile), width, height)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 120)
            example = wait.until(
                lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".gallery-item") if e.is_displayed()]
            )
            example[0].click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
            driver.find_element(By.ID, "classify-button").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".oscq-variant"))
            written.append(out / "space_classify.png")
            driver.save_screenshot(str(written[-1]))
            tab = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text == "Accuracy")
            tab.click()
            wait.until(
                lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "#accuracy-plot img") if i.is_displayed()]
            )
            driver.set_window_size(width, height + 200)  # the plot and the whole table
            driver.execute_script("window.scrollTo(0, 0)")
            written.append(out / "space_accuracy.png")
            driver.save_screenshot(str(written[-1]))
        finally:
            driver.quit()
            demo.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="export folders (or Hub repo ids) to show")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs", help="folder for the PNG files")
    for path in take(parser.parse_args().exports, parser.parse_args().out):
        sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("screenshots.py", main))
