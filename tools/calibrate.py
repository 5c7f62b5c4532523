"""`qat calibrate` as a script: python tools/calibrate.py --help"""
import sys

from qat.cli import main

sys.exit(main(['calibrate'] + sys.argv[1:]))
