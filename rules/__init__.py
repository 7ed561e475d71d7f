"""The built-in rule files (installed as the `surgery_rules` package)."""
