"""Load tests and the fan-out benchmark: see loadtest/README.md."""
