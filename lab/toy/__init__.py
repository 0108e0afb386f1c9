"""The toy world's lab: training the shipped toy models, their quality checks and ShapesBench.

The world itself (scenes, the checker, the checker reward) is part of the product: `diffedit.toy`.
"""
