"""`qat verify` as a script: python tools/verify.py --help"""
import sys

from qat.cli import main

sys.exit(main(['verify'] + sys.argv[1:]))
