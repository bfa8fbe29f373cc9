"""`llamafactory-cli webchat` with use_kt through ktchat's hook, driven in a real browser.

Runs where LLaMA-Factory, gradio and selenium are installed and Debian's chromium + chromedriver are on PATH
(.venv-lfkt; scripts/install_lfkt.sh installs all of them). webchat loads the YAML's model as it starts (its page
has no load button: that is `llamafactory-cli webui`'s Chat tab); the test waits until the page is served, asks a
trained question in the page's box, reads the streamed answer off the page and saves a screenshot (in the test's
tmp folder; `KTCHAT_WEBCHAT_SCREENSHOT=docs/webchat-kt.png` refreshes the one in docs/).
"""

import importlib.util
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from servers import free_port, running

MISSING = [name for name in ("llamafactory", "gradio", "selenium") if importlib.util.find_spec(name) is None]
MISSING += [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed here: {', '.join(MISSING)} "
                                "(scripts/install_lfkt.sh makes .venv-lfkt with them; scripts/test.sh runs this there)")
START_TIMEOUT = 300


@pytest.fixture
def webchat(tiny, tmp_path):
    """The real `llamafactory-cli webchat CONFIG` on 127.0.0.1; yields (url, log path)."""
    config = tmp_path / "webchat.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny.model), "adapter_name_or_path": str(tiny.adapter), "use_kt": True,
        "infer_backend": "huggingface", "lora_rank": 8, "kt_config": {"kt_num_threads": 1}, "do_sample": False,
        "max_new_tokens": 32}))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "KTCHAT_LLAMAFACTORY_HOOK": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "BROWSER": "true"}  # launch(inbrowser=True) opens nothing
    log_path = tmp_path / "webchat.log"
    cli = Path(sys.executable).parent / "llamafactory-cli"
    with running([str(cli), "webchat", str(config)], env=env, cwd=tmp_path, log_path=log_path,
                 ready=lambda: _listening(port), timeout=START_TIMEOUT, what="webchat"):
        yield f"http://127.0.0.1:{port}", log_path


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _bot_text(driver) -> str:
    from selenium.webdriver.common.by import By

    messages = driver.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')
    return messages[-1].text.strip() if messages else ""


def test_webchat_in_a_browser_answers_through_ktchat(webchat, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from ktchat.tinymodels import TRAINED_QA

    url, log_path = webchat
    question, answer = TRAINED_QA[0]
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    # by structure, not by label: with gradio 5.50 the page keeps gradio's default labels ("Run", "Dropdown") until
    # a language is picked (webchat's start sets lang to the value the dropdown already has, so no change fires)
    box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, 'textarea[rows="8"]')))  # the query box
    box.send_keys(question)
    browser.find_element(By.CSS_SELECTOR, "button.primary").click()  # the query's submit button
    # the reply streams in: wait until it holds the whole answer, then until it stops growing
    wait.until(lambda d: answer in _bot_text(d))
    time.sleep(1)
    reply = _bot_text(browser)
    browser.execute_script("window.scrollTo(0, 0)")  # the send scrolled the page down to the query box
    screenshot = Path(os.environ.get("KTCHAT_WEBCHAT_SCREENSHOT") or tmp_path / "webchat-kt.png")
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    assert reply == answer
    user = browser.find_elements(By.CSS_SELECTOR, '[data-testid="user"]')
    assert user and user[-1].text.strip() == question
    log = log_path.read_text()
    assert "[ktchat] use_kt: LLaMA-Factory's huggingface engine will load" in log, log[-3000:]
    assert "routed-expert LoRA modules -> CPU experts" in log
