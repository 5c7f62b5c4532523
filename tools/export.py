"""`qat export` as a script: python tools/export.py --help"""
import sys

from qat.cli import main

sys.exit(main(['export'] + sys.argv[1:]))
