import sys
from pathlib import Path

# The benchmark workloads import each other by module name, as pytest runs them from benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
