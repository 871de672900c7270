"""`python -m mi_scale.plan`: the README's validation table (each run for real)."""

from mi_scale.plan.measure import validate

validate()
