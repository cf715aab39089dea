import os
import sys

# tests import their helpers (tiny.py) and the package from the repository root
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
