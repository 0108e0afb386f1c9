"""The lab: what the product is measured and built with, never imported by it.

`lab.benchmarks` (behind `diffedit bench`), `lab.toy` (toy-model training, quality checks and
ShapesBench, behind `diffedit toy` and `diffedit bench shapes`) and `lab.testing` (tiny pipelines
built in code for the tests). The `bench` and `toy` commands import it only when they run.
"""
