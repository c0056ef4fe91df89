"""The bottom layer: one-line user errors, atomic file writes, distributed helpers, the logger and
console, the offline assets."""
