"""Training data: training sets read per step from memory-mapped Arrow data, the built-in
InsuranceQA data, and the rows of each global batch."""
