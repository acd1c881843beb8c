"""Benchmarks (not timed tests): ``python -m bench`` runs them all, ``python -m bench.<name>`` one.

Each module measures a baseline in the same run and prints ratios against it plus a markdown table.
"""
