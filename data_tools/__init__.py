"""Command-line tools for WebDataset shards: `python -m data_tools.make_shards`, `make_demo`,
`verify_shards`. Each has `--help`."""
