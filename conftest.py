"""Root conftest: doctest examples that are all marked `+SKIP` (calls that need the real Hub or a model
download) are documentation, not tests: they are not collected, so no skipped test is left in the report."""

import doctest


def pytest_collection_modifyitems(config, items):
    items[:] = [item for item in items
                if not (getattr(item, "dtest", None) is not None and item.dtest.examples
                        and all(ex.options.get(doctest.SKIP) for ex in item.dtest.examples))]
