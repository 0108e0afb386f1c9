"""The toy world the product can judge edits in: scenes of coloured shapes, the checker that reads them
back, and the checker reward for FK steering. Training and benchmarks on it live in `lab.toy`."""
