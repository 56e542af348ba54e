"""The web app's picture in the README (docs/app.png): the small world's adapters (``make proof``) served by
``dreamcache app``, a held-out subject picked and generated with attention maps, in headless chromium.

    make proof && make app-screenshot        # python docs/screenshot.py --proof proof --out docs/app.png

Needs Debian's chromium (apt-get install chromium); Playwright drives it, without a browser download of its own.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CHROMIUM = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--proof", default="proof", help="the folder `make proof` wrote (its run/ and heldout/)")
    p.add_argument("--subject", default="red_plain_circle", help="the held-out subject to pick")
    p.add_argument("--out", default="docs/app.png")
    args = p.parse_args()
    proof = Path(args.proof)
    if not (proof / "run" / "adapters.safetensors").is_file():
        sys.exit(f"no adapters in {proof}/run: run `make proof` first")
    browser = next((shutil.which(c) for c in CHROMIUM if shutil.which(c)), None)
    if browser is None:
        sys.exit("no chromium: apt-get install chromium")

    from playwright.sync_api import expect, sync_playwright

    from dreamcache.app import serve
    from dreamcache.commands import AppConfig
    from dreamcache.models import quiet_model_loading

    quiet_model_loading()
    cfg = AppConfig(adapters=str(proof / "run"), dreambooth=str(proof / "heldout"), segmenter="key", port=0,
                    device="cpu")
    demo, url = serve(cfg, block=False)
    try:
        with sync_playwright() as pw:
            page = pw.chromium.launch(executable_path=browser, args=["--no-sandbox"]).new_page(
                viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(0)
            page.goto(url)
            page.get_by_label("DreamBooth subject").click()
            page.get_by_role("option", name=args.subject, exact=True).click()
            expect(page.locator("#prompts textarea")).not_to_have_value("", timeout=0)
            page.get_by_label("Images per prompt").last.fill("2")
            page.get_by_label("Attention maps").check()
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("made once and reused", timeout=0)
            expect(page.locator("#images img").first).to_be_visible(timeout=0)
            page.screenshot(path=args.out, full_page=True)
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
