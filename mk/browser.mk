# The browser the dashboard tests open (tests/distributed/test_dashboard_browser.py, test_dashboard.py): Debian's
# chromium and chromium-driver, installed with apt-get when missing (root; an `apt-get update` first when the
# package lists do not know them), as the SLURM test fixture installs SLURM. Without root or apt-get, or when the
# install fails, it says so and goes on: the browser tests then skip with the reason. Included from the Makefile.
#
#   make browser       # once per machine (~1 min, ~300 MB); `make test-core` runs it first

BROWSER_PACKAGES ?= chromium chromium-driver

.PHONY: browser

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "browser: chromium/chromedriver missing and no root apt-get to install them ($(BROWSER_PACKAGES));" \
			"the dashboard's browser tests will skip" >&2; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	install="apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES)"; \
	echo "browser: $$install"; \
	$$install >/dev/null 2>&1 || { apt-get update -q >/dev/null && $$install >/dev/null; } || \
		echo "browser: installing $(BROWSER_PACKAGES) failed; the dashboard's browser tests will skip" >&2
