import sys
from pathlib import Path

# tests and benchmarks share the harness in tools/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
