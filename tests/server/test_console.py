"""The web console in a real Chromium (Playwright driving Debian's /usr/bin/chromium): log in, see
the dashboard, create a scheduled job and watch it run, browse a restore point and download a file
whose bytes equal the source, start a lab verification and read its outcome."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.mount.conftest import MiB, make_ext4, needs_root_and_tools
from tests.server.conftest import ADMIN_PASSWORD, ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    *needs_root_and_tools(),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (scripts/setup test installs it)"),
]


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    staging = base / "staging"
    (staging / "etc" / "app").mkdir(parents=True)
    (staging / "etc" / "app" / "config.ini").write_text("[app]\nname = web01 <script>alert(1)</script>\n")
    (staging / "data.bin").write_bytes(os.urandom(3 * MiB + 17))
    image = base / "web01.img"
    make_ext4(image, staging, size=32 * MiB)
    server = ServerProcess(base / "server")
    server.init_repository()
    server.start()
    yield server, image, staging
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, console):
    server = console[0]
    context = browser.new_context(base_url=server.url, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def log_in(page) -> None:
    page.goto("/")
    assert "/login" in page.url  # not logged in: the console sends us to the login page
    page.fill("input[name=name]", "admin")
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    assert page.inner_text(".error") == "wrong user name or password"
    page.fill("input[name=name]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Dashboard')")


def test_console_job_run_browse_download_and_lab(page, console, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    server, image, staging = console
    log_in(page)
    expect(page.locator("#systems")).to_contain_text("No restore points yet.")

    # a job on a schedule a few seconds away, made in the job editor
    page.click("text=Jobs")
    page.click("#new-job")
    page.fill("input[name=name]", "web01-disks")
    page.select_option("select[name=kind]", "files")
    page.fill("textarea[name=targets]", str(image))
    page.fill("input[name=point_name]", "web01")
    page.fill("input[name=schedule]", "*/4 * * * * *")
    page.fill("input[name=timezone]", "Europe/Berlin")
    page.click("#save-job")
    row = page.locator("tr[data-job='web01-disks']")
    expect(row).to_contain_text("*/4 * * * * *")

    # watch it run: the jobs page links its first session, whose page follows the log live
    link = row.locator("a[href^='/sessions/']")
    for _ in range(120):  # the first tick is at most 4 s away; a loaded machine may take longer
        page.reload()
        if link.count():
            break
        page.wait_for_timeout(500)
    link.click()
    expect(page.locator("#state")).to_have_text("success", timeout=120_000)
    expect(page.locator("#log")).to_contain_text("$ surepoint backup")
    expect(page.locator("#log")).to_contain_text("disk 0")

    # stop the schedule in the editor (the job stays, run by hand from now on)
    page.goto("/jobs")
    row.locator("text=edit").click()
    page.fill("input[name=schedule]", "")
    page.click("#save-job")
    expect(row).not_to_contain_text("*/4")

    # the dashboard knows the system now
    page.goto("/")
    expect(page.locator("#systems")).to_contain_text("web01")

    # browse the restore point and download a file
    page.click("text=Restore points")
    page.locator("#points a[href^='/points/main/']").first.click()
    expect(page.locator("h1")).to_contain_text("Restore point")
    page.click("#browse")
    files = page.locator("#files")
    expect(files).to_contain_text("data.bin")
    files.locator("a:text('etc/')").click()
    files.locator("a:text('app/')").click()
    expect(page.locator("#cwd")).to_have_text("/etc/app")
    with page.expect_download() as info:
        files.locator("tr:has-text('config.ini') a.download").click()
    target = tmp_path / "config.ini"
    info.value.save_as(target)
    assert target.read_bytes() == (staging / "etc" / "app" / "config.ini").read_bytes()
    page.goto(page.url.split("?")[0] + "?browse=1")
    with page.expect_download() as info:
        files.locator("tr:has-text('data.bin') a.download").click()
    info.value.save_as(tmp_path / "data.bin")
    assert (tmp_path / "data.bin").read_bytes() == (staging / "data.bin").read_bytes()

    # restore a directory through the restore form: a session whose files equal the source
    point_url = page.url.split("?")[0]
    page.goto(point_url)
    form = page.locator("#restore-files")
    form.locator("textarea[name=paths]").fill("/etc/app")
    form.locator("input[name=to]").fill(str(tmp_path / "restored"))
    form.locator("button[type=submit]").click()
    expect(page).to_have_url(re.compile(r"/sessions/\d+$"))
    expect(page.locator("#state")).to_have_text("success", timeout=120_000)
    restored = tmp_path / "restored" / "etc" / "app" / "config.ini"
    assert restored.read_bytes() == (staging / "etc" / "app" / "config.ini").read_bytes()

    # a lab verification: this restore point holds disk images, not a VM, and the report says so
    page.goto(point_url)
    page.click("#start-lab")
    expect(page).to_have_url(re.compile(r"/sessions/\d+$"))
    expect(page.locator("#state")).to_have_text("failed", timeout=120_000)
    expect(page.locator("#message")).to_contain_text("a lab can only boot VMs")
    expect(page.locator("#lab-report")).to_contain_text("The lab did not run")
    expect(page.locator("#log")).to_contain_text("$ surepoint lab verify")

    # the audit trail has the console's changes and the downloads
    page.goto("/audit")
    audit = page.locator("#audit")
    expect(audit).to_contain_text("POST /jobs/new")
    expect(audit).to_contain_text("download")
    expect(audit).to_contain_text("POST /points/main/")


def test_console_roles_and_logout(page, console) -> None:
    from playwright.sync_api import expect

    server = console[0]
    with server.client() as api:
        created = api.post("/users", json={"name": "auditor1", "password": "an auditor password", "role": "auditor"})
        assert created.status_code == 201, created.text
    page.goto("/login")
    page.fill("input[name=name]", "auditor1")
    page.fill("input[name=password]", "an auditor password")
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Dashboard')")
    page.goto("/jobs/new")
    expect(page.locator("h1")).to_have_text("403")
    page.goto("/jobs")
    expect(page.locator("#new-job")).to_have_count(0)
    page.click("text=Log out")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/sessions")
    assert "/login" in page.url
