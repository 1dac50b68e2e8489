"""scripts/convert_weights.py under its earlier name: the same flags, the same output."""

import runpy
from pathlib import Path

if __name__ == "__main__":
  runpy.run_path(str(Path(__file__).with_name("convert_weights.py")), run_name="__main__")
