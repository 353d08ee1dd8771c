"""``python -m benchmarks [URL] [--quick] [--json PATH]``: the whole suite; see benchmarks/README.md."""

from benchmarks.suite import main

main()
