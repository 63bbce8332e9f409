"""The built-in benchmarks behind `transfigure bench`."""
