import sys
from pathlib import Path

# Tests import the helpers package from tests/ (the product itself is pip-installed).
sys.path.insert(0, str(Path(__file__).resolve().parent))
