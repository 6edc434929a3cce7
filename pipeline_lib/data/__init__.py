"""Data sources, the prepared-dataset store and the fetch logic (see the data contract in the README)."""
