import os
import sys

# tests import the top-level modules (model, data, ...) of the repository
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
