"""nbval settings for the notebook series: compare what the notebooks compute, not library chatter."""


def pytest_collectstart(collector):
    # stderr carries library warnings and progress bars; HTML duplicates the text/plain it is compared by,
    # and widget views carry random ids.
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "application/vnd.jupyter.widget-view+json")
