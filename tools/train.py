"""`qat train` as a script: python tools/train.py recipes/digits.yaml [--set key=value] [--resume]"""
import sys

from qat.cli import main

sys.exit(main(['train'] + sys.argv[1:]))
