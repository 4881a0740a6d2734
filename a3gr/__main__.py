"""`python -m a3gr ...` runs the CLI without the console script (benchmarks, spark-submit)."""
from a3gr.cli import app

if __name__ == "__main__":
    app()
