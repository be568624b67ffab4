"""Multi-bank scenarios on Flower's simulation engine, and the `fedfin` command line."""
