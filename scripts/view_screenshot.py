"""A screenshot of `minigpt view` on a trained model, as the README shows it.

    python scripts/view_screenshot.py runs/shakespeare_char_cpu docs/view.png --prompt "ROMEO:" --click 20

Starts `minigpt view` on a free port, opens the page in headless Chromium (Debian's chromium and
chromedriver: scripts/install_browser.sh), generates from the prompt, hovers over and clicks one
character, and saves the page as PNG.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--length", default="200")
    parser.add_argument("--click", type=int, default=20, help="the character to click (and hover over)")
    parser.add_argument("--head", default="0", help="layer and head to study, e.g. 1,2")
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, "-m", "minigpt", "view", "--checkpoint", args.checkpoint, "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    url = next(m.group(1) for line in server.stderr if (m := re.search(r"at (http://\S+/) ", line)))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,1250"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, 300)
        driver.get(url)
        wait.until(lambda d: "bits/char over" in d.find_element(By.CSS_SELECTOR, '#info td[data-key="exact val"]').text)
        driver.find_element(By.ID, "prompt").send_keys(args.prompt)
        length = driver.find_element(By.ID, "length")
        length.clear()
        length.send_keys(args.length)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "text").get_attribute("data-state") == "done")
        span = driver.find_elements(By.CSS_SELECTOR, "#text .ch")[args.click]
        span.click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heads .mini"))
        layer, head = args.head.split(",") if "," in args.head else ("0", args.head)
        driver.find_element(By.CSS_SELECTOR, f'#heads .mini[data-layer="{layer}"][data-head="{head}"]').click()
        wait.until(lambda d: d.find_element(By.ID, "explain").get_attribute("data-head") == head)
        span = driver.find_elements(By.CSS_SELECTOR, "#text .ch")[args.click]  # clicking drew the text anew
        ActionChains(driver).move_to_element(span).perform()
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.terminate()


if __name__ == "__main__":
    main()
