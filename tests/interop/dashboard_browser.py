"""Drives the control plane's dashboard in a real headless browser (Debian's Chromium,
through Playwright), as an operator would: a wrong token is refused, the right one shows
the fleet by region; a bad edit is flagged as it is typed (field named, Apply off), a good
one shows its change against what is served and is applied; a rollback from the history
goes through. Writes a screenshot. Exits non-zero, saying what it expected, on the first
thing that is not so.

Usage: dashboard_browser.py URL TOKEN NODE REGION SCREENSHOT CHROMIUM
  URL: the control plane's API (https://127.0.0.1:PORT); its certificate is the control
  plane's own CA's, which this throwaway browser profile does not know, so TLS errors are
  ignored here (the page and API are still served over TLS).
"""

import re
import sys

from playwright.sync_api import expect, sync_playwright

TIMEOUT_MS = 15_000


def main() -> None:
    url, token, node, region, screenshot, chromium = sys.argv[1:7]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 1400})
        page = context.new_page()
        expect.set_options(timeout=TIMEOUT_MS)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda dialog: dialog.accept())

        page.goto(f"{url}/dashboard")
        expect(page).to_have_title("NIP control plane")

        # A token the control plane does not know is refused.
        page.fill("#token", "nip_000000000000_" + "1" * 64)
        page.click("#sign-in-form button")
        expect(page.locator("#sign-in-error")).not_to_be_empty()
        expect(page.locator("#main")).to_be_hidden()

        # The operator's token: the fleet by region.
        page.fill("#token", token)
        page.click("#sign-in-form button")
        expect(page.locator("#main")).to_be_visible()
        proxy_row = page.locator(f'tr[data-node="{node}"]')
        expect(proxy_row).to_contain_text("in sync")
        expect(page.locator("#regions")).to_contain_text(f"{region} — 1 of 1 connected")

        # Per-route traffic from the records the proxy streams.
        expect(page.locator("#traffic-rows tr[data-route]")).not_to_have_count(0)
        expect(page.locator("#traffic-rows")).to_contain_text(" ms")

        # Log search: the newest records, filtered by status; a bad filter is explained.
        expect(page.locator("#log-rows")).to_contain_text(node)
        page.fill("#log-status", "5xx")
        page.click("#log-search button")
        expect(page.locator("#log-rows")).to_contain_text("no records match")
        page.fill("#log-status", "7xx")
        page.click("#log-search button")
        expect(page.locator("#log-error")).to_contain_text("7xx")
        page.fill("#log-status", "200")
        page.click("#log-search button")
        expect(page.locator("#log-rows")).to_contain_text("GET")

        # The served config is in the editor; a bad edit is flagged by field, Apply off.
        editor = page.locator("#editor")
        expect(editor).to_have_value(re.compile("services:"))
        served = editor.input_value()
        editor.fill(served.replace("services:", "servicez:"))
        expect(page.locator("#validation")).to_contain_text("invalid")
        expect(page.locator("#validation")).to_contain_text("servicez")
        expect(page.locator("#apply")).to_be_disabled()

        # A good edit: its change against what is served, then applied.
        changed = served.replace("routes:", "# from the dashboard test\nroutes:")
        editor.fill(changed)
        expect(page.locator("#validation")).to_contain_text("valid")
        expect(page.locator("#diff")).to_contain_text("+# from the dashboard test")
        expect(page.locator("#apply")).to_be_enabled()
        page.fill("#message", "browser test change")
        page.click("#apply")
        expect(page.locator("#apply-result")).to_contain_text("applied and pushed to every proxy")
        expect(page.locator("#history-rows")).to_contain_text("browser test change")

        # Roll back to version 1 from the history.
        page.click('tr[data-version="1"] button')
        expect(page.locator("#apply-result")).to_contain_text("restores version 1")
        expect(page.locator("#event-list")).to_contain_text("rollback")
        expect(proxy_row).to_contain_text("in sync")

        page.screenshot(path=screenshot, full_page=True)
        browser.close()
        if errors:
            raise SystemExit(f"the page threw: {errors}")
    print("ok")


if __name__ == "__main__":
    main()
