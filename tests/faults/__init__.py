"""Fault injection: kills between and inside stages, concurrent runs, an unwritable or full lake, hostile input, secrets."""
